"""What the trainer and the rollout need from a model family, whatever the family.

An adapter owns the model, its processor and tokenizer, and knows how the family builds
inputs and writes boxes. It knows nothing about tasks.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from PIL import Image
from torch.utils.checkpoint import checkpoint
from transformers import AutoTokenizer
from transformers.models.auto.tokenization_auto import get_tokenizer_config
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from gpg_vl.boxes import BoxConvention
from gpg_vl.task import Prompt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
# Inputs with one entry per token: they grow with the completion (zeros = text tokens).
PER_TOKEN_KEYS = ("mm_token_type_ids",)
END_TOKENS = ("<|im_end|>", "<|endoftext|>")


def torch_dtype(name: str) -> torch.dtype | str:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer at `path`. One that declares the generic class is loaded as its
    tokenizer.json says: AutoTokenizer (transformers 5.23) would load a `qwen2` checkpoint
    with Qwen2Tokenizer whatever it declares, and that class rebuilds the pre-tokenizer with
    Qwen's digit-splitting pattern, so the tiny models' numbers would stop being one token."""
    declared = get_tokenizer_config(path).get("tokenizer_class")
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return TokenizersBackend.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[ids] in float32, without a float32 log-softmax of the
    whole vocabulary."""
    logits = logits.float() / temperature  # [N, C, V]
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [N, C]
    return picked - torch.logsumexp(logits, dim=-1)  # [N, C]


def chunked_token_logprobs(logits: torch.Tensor, ids: torch.Tensor, chunk_size: int,
                           temperature: float = 1.0) -> torch.Tensor:
    """Per-position log-probabilities of `ids` under `logits` [N, T, V], `chunk_size`
    positions at a time. Under autograd each chunk is checkpointed: otherwise every chunk's
    float32 copy of the logits would be kept for the backward pass, undoing the chunking."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    out = []
    for start in range(0, ids.shape[1], chunk_size):
        part, part_ids = logits[:, start:start + chunk_size], ids[:, start:start + chunk_size]
        if torch.is_grad_enabled() and part.requires_grad:
            out.append(checkpoint(_token_logprobs, part, part_ids, temperature, use_reentrant=False))
        else:
            out.append(_token_logprobs(part, part_ids, temperature))
    return torch.cat(out, dim=1)  # [N, T]


class ModelAdapter:
    """Base of the model families. Subclasses set `model_type` and `has_vision`, load
    themselves in `load`, and render prompts in `build_inputs`."""

    model_type: ClassVar[str] = ""
    has_vision: ClassVar[bool] = False

    def __init__(self, model, processor, tokenizer, box_convention: BoxConvention):
        self.model = model
        self.processor = processor
        self.tokenizer = tokenizer
        self.box_convention = box_convention
        # Batches are left-padded so that every prompt ends where generation starts.
        tokenizer.padding_side = "left"
        self.eos_token_ids = self._eos_token_ids()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = self.eos_token_ids[0]
        self.pad_token_id: int = tokenizer.pad_token_id
        self.suppressed_token_ids: list[int] = self._suppressed_token_ids()

    @classmethod
    def load(cls, path: str, *, dtype: str, max_pixels: int, min_pixels: int, attn_implementation: str | None,
             trust_remote_code: bool) -> "ModelAdapter":
        """Load model, processor and tokenizer (see gpg_vl.models.load_adapter); models
        without vision ignore the pixel limits."""
        raise NotImplementedError

    def _known_id(self, token: str) -> int | None:
        """The id of `token` if the vocabulary has it as a single token, else None."""
        ids = self.tokenizer.convert_tokens_to_ids([token])
        tid = ids[0] if ids else None
        return tid if tid is not None and tid != self.tokenizer.unk_token_id else None

    def _eos_token_ids(self) -> list[int]:
        found = [self._known_id(t) for t in END_TOKENS] + [self.tokenizer.eos_token_id]
        config_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        found += config_eos if isinstance(config_eos, list) else [config_eos]
        ids = sorted({int(t) for t in found if t is not None})
        if not ids:
            raise ValueError(f"{self.model_type}: no end-of-completion token found in the tokenizer or generation config")
        return ids

    def _suppressed_token_ids(self) -> list[int]:
        return []

    def render(self, prompt: Prompt) -> str:
        """The text the model reads for `prompt`: a chat with the family's template and the
        generation prompt (image placeholders before the processor expands them); a str as it is."""
        raise NotImplementedError

    def build_inputs(self, prompts: list[Prompt], images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
        """Left-padded CPU batch: input_ids [N, P], attention_mask [N, P], and for vision
        models what the processor returns for the images (pixel_values, image_grid_thw,
        mm_token_type_ids). Chat prompts get the chat template with the generation prompt;
        a str prompt is used as it is."""
        raise NotImplementedError

    def build_group_inputs(self, prompts: list[Prompt], images: list[list[Image.Image]],
                           repeats: int) -> dict[str, torch.Tensor]:
        """`build_inputs` of the prompts each repeated `repeats` times in a row (a group's G
        samples), with each prompt rendered and each image processed once."""
        return self.repeat_samples(self.build_inputs(prompts, images), [len(i) for i in images], repeats)

    def repeat_samples(self, batch: dict[str, torch.Tensor], images_per_sample: list[int],
                       repeats: int) -> dict[str, torch.Tensor]:
        """Each sample of a built batch `repeats` times in a row. Here every input has one
        entry per sample; vision families also repeat their per-image inputs."""
        return {k: v.repeat_interleave(repeats, dim=0) for k, v in batch.items()}

    def forward_inputs(self, prompt_inputs: dict[str, Any], completion_ids: torch.Tensor,
                       completion_mask: torch.Tensor) -> dict[str, Any]:
        """The prompt batch extended by the completions, on the completions' device."""
        device = completion_ids.device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in prompt_inputs.items()}
        mask = completion_mask.to(device=device, dtype=inputs["attention_mask"].dtype)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], completion_ids], dim=1)  # [N, P+T]
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], mask], dim=1)  # [N, P+T]
        for key in PER_TOKEN_KEYS:
            if key in inputs:
                # Completion tokens are text: without this, Qwen2.5-VL silently computes wrong positions.
                zeros = inputs[key].new_zeros(completion_ids.shape)
                inputs[key] = torch.cat([inputs[key], zeros], dim=1)  # [N, P+T]
        return inputs

    def completion_logprobs(self, model, prompt_inputs: dict[str, Any], completion_ids: torch.Tensor,
                            completion_mask: torch.Tensor, chunk_size: int = 64,
                            temperature: float = 1.0) -> torch.Tensor:
        """log pi_T(o_t | prompt, o_<t) of each completion token, float32 [N, T], 0 where the
        mask is 0, with pi_T the sampling distribution softmax(logits / temperature): the policy
        gradient is taken of the distribution the completions were drawn from. `model` may be
        a DDP/DeepSpeed wrapper of `self.model`: it is called through its own forward so that
        gradients synchronise."""
        inputs = self.forward_inputs(prompt_inputs, completion_ids, completion_mask)
        num_tokens = completion_ids.shape[1]
        # Logits at positions P-1 .. P+T-1; the last one predicts past the completion.
        logits = model(**inputs, logits_to_keep=num_tokens + 1, use_cache=False).logits[:, :-1]  # [N, T, V]
        logprobs = chunked_token_logprobs(logits, completion_ids, chunk_size, temperature)  # [N, T]
        return logprobs * completion_mask.to(logprobs.dtype)

    def save_processor(self, path) -> None:
        """Tokenizer and chat template (and, for vision families, the image processor) in
        the layout released checkpoints use, so `load_adapter(path)` reads them back."""
        self.tokenizer.save_pretrained(path)

    def decode(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
        """Text of each completion, masked-out positions and special tokens left out."""
        texts = []
        for ids, mask in zip(completion_ids.tolist(), completion_mask.tolist()):
            kept = [t for t, m in zip(ids, mask) if m]
            texts.append(self.tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False))
        return texts
