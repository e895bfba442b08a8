"""LoRA through peft, and freezing the vision tower: what of the model a run trains.

    model.lora.rank > 0  ->  low-rank adapters injected in place into the language model's
                             linear layers (the Hugging Face model keeps its class, so the
                             adapter, the loss forward and generation do not change); every
                             other weight frozen
    model.freeze_vision_tower  ->  the vision tower and its merger(s) take no gradient

The vision tower and merger never get adapters by default: vLLM serves LoRA on the language
model only, and the trained weights are pushed into vLLM, and exported under hf/, merged
(W + alpha / r * B A), so that plain transformers and vLLM load them as a full model. A
checkpoint also holds the adapter alone in peft's layout (`adapter/`), loadable with
`peft.PeftModel.from_pretrained(base_model, folder)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

# The language model's projections in every Qwen2 / Qwen2.5 / Qwen3 (-VL) decoder layer.
LANGUAGE_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Module paths of the vision tower and its merger(s) (Qwen-VL: model.visual.*, the merger and
# Qwen3-VL's DeepStack mergers inside it). Qwen2.5-VL's vision blocks also name their MLP
# gate_proj / up_proj / down_proj: without this exclusion they would be adapted too.
VISION_MODULES = r".*\bvisual\b.*"
ADAPTER_NAME = "default"
SAVED = f".modules_to_save.{ADAPTER_NAME}."  # a module trained whole: its trained copy
ORIGINAL = ".original_module."  # ... and the untouched original peft keeps beside it


@dataclass
class LoraSettings:
    rank: int = 0
    """r: rank of each adapter; 0 = no LoRA (full fine-tuning)."""
    alpha: float = 16.0
    """The adapter's output is scaled by alpha / rank (alpha / sqrt(rank) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapters' input during training."""
    target_modules: list[str] = field(default_factory=lambda: list(LANGUAGE_PROJECTIONS))
    """Names of the linear layers that get adapters (in the language model; the vision tower and merger are left out unless include_vision)."""
    include_vision: bool = False
    """Also adapt matching layers of the vision tower and merger (vLLM cannot serve those as LoRA; they are pushed merged)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(rank)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained whole beside the adapters, by name ending (peft's modules_to_save): e.g. norm, which also matches every *layernorm (a random-init model cannot sharpen its output through frozen norms)."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def check(self) -> list[str]:
        """What is wrong with these settings (empty: nothing)."""
        problems = []
        if self.rank < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            problems.append("model.lora needs rank >= 0, alpha > 0 and 0 <= dropout < 1")
        if self.enabled and not self.target_modules:
            problems.append("model.lora.target_modules is empty: name the linear layers to adapt")
        return problems


def configure_training(model: torch.nn.Module, lora: LoraSettings, freeze_vision_tower: bool) -> None:
    """Inject the adapters (in place) and freeze what is not trained."""
    if freeze_vision_tower:
        visual = vision_tower(model)
        if visual is None:
            raise ValueError("model.freeze_vision_tower: this model has no vision tower (a text model)")
        visual.requires_grad_(False)
    if not lora.enabled:
        return
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_rslora=lora.rslora,
                        target_modules=list(lora.target_modules), bias="none",
                        modules_to_save=list(lora.modules_to_save) or None,
                        exclude_modules=VISION_MODULES if vision_tower(model) is not None and not lora.include_vision
                        else None)
    try:
        inject_adapter_in_model(config, model, ADAPTER_NAME)
    except ValueError as err:  # peft: "No modules were targeted for adaptation ..."
        where = "the model" if lora.include_vision else "the language model (the vision tower is left out)"
        raise ValueError(f"model.lora.target_modules {list(lora.target_modules)} name no linear layer of {where}; "
                         f"Qwen models have {', '.join(LANGUAGE_PROJECTIONS)} (peft: {err})") from err
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or SAVED in name)
    model.peft_config = {ADAPTER_NAME: config}  # what peft's own save and merge functions read


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    inner = getattr(model, "model", None)
    return getattr(inner, "visual", None)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def merged_state_dict(state: dict[str, Tensor], lora: LoraSettings) -> dict[str, Tensor]:
    """A LoRA model's state_dict (any prefix, e.g. from accelerator.get_state_dict, gathered
    under ZeRO-3) as the plain model's: each adapted layer's weight W + scaling * B A under the
    layer's own name, the adapters dropped. A pure function: the trained model is not touched.
    Without LoRA the state_dict is returned as it is."""
    if not lora.enabled:
        return state
    out = {}
    for key, value in state.items():
        if ".lora_" in key or ORIGINAL in key:
            continue
        if SAVED in key:
            out[key.replace(SAVED, ".")] = value
            continue
        if ".base_layer." in key:
            layer, _, leaf = key.partition(".base_layer.")
            if leaf == "weight":
                a, b = state[f"{layer}.lora_A.{ADAPTER_NAME}.weight"], state[f"{layer}.lora_B.{ADAPTER_NAME}.weight"]
                # [out, r] @ [r, in] in float32, then back to the weight's dtype (bf16 under DeepSpeed).
                value = (value.float() + lora.scaling * (b.float() @ a.float())).to(value.dtype)
            key = f"{layer}.{leaf}"
        out[key] = value
    return out


def adapter_state_dict(model: torch.nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapters (and modules trained whole) alone, named as peft saves them for
    PeftModel.from_pretrained (`base_model.model.<layer>.lora_A.weight`, ...)."""
    from peft import get_peft_model_state_dict

    return {"base_model.model." + key: value.contiguous()
            for key, value in get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER_NAME).items()}


def save_adapter(model: torch.nn.Module, state: dict[str, Tensor], folder: Path, base_path: str) -> None:
    """peft's adapter folder: adapter_config.json and adapter_model.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[ADAPTER_NAME]
    config.base_model_name_or_path = base_path
    config.save_pretrained(str(folder))
    save_file(adapter_state_dict(model, state), str(folder / "adapter_model.safetensors"))


def count(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters."""
    return sum(p.numel() for p in trainable_parameters(model)), sum(p.numel() for p in model.parameters())
