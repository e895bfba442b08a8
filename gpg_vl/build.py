"""What a training run is made of, built from its config: the accelerator, the policy and its
optimizer, the task's rows, an optional reference model, the resume point.

Each function does one job; the trainer calls them in order and keeps what they return.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpg_vl.checkpoint import finish_interrupted, list_checkpoints, resolve_resume
from gpg_vl.config import Config, TrainConfig
from gpg_vl.lora import configure_training, trainable_parameters
from gpg_vl.models.policy import PolicyLogprobs
from gpg_vl.rollout import Engine, HFEngine
from gpg_vl.task import Prompt, Row, Task
from gpg_vl.trackers import require_installed


def make_accelerator(t: TrainConfig):
    from accelerate import Accelerator

    mixed = t.mixed_precision if t.mixed_precision != "auto" else ("bf16" if torch.cuda.is_available() else "no")
    require_installed(t.report_to)
    return Accelerator(gradient_accumulation_steps=t.grad_accum, mixed_precision=mixed,
                       log_with=list(t.report_to) or None, project_dir=t.output_dir)


def weights_dtype(cfg: Config, accelerator) -> str:
    """model.dtype, with auto = bf16 weights only where DeepSpeed keeps fp32 master weights."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    ds = accelerator.state.deepspeed_plugin
    return "bfloat16" if ds is not None and accelerator.mixed_precision == "bf16" else "float32"


def load_policy(cfg: Config, dtype: str, gradient_checkpointing: bool, trained: bool = True):
    """The model family's adapter around the checkpoint at model.path; `trained`: with the LoRA
    adapters and frozen parts model.lora and model.freeze_vision_tower ask for (not the reference)."""
    from gpg_vl.models import load_adapter

    m = cfg.model
    adapter = load_adapter(m.path, dtype=dtype, max_pixels=m.max_pixels, min_pixels=m.min_pixels,
                           attn_implementation=m.attn_implementation or None, trust_remote_code=m.trust_remote_code,
                           gradient_checkpointing=gradient_checkpointing)
    if trained:
        configure_training(adapter.model, m.lora, m.freeze_vision_tower)
        adapter.lora = m.lora
    return adapter


def load_reference(cfg: Config, accelerator, dtype: str) -> PolicyLogprobs | None:
    """The frozen reference of GRPO's KL term, only when one is asked for (never for GPG)."""
    a = cfg.algorithm
    if a.name == "gpg" or a.kl_coef <= 0:
        return None
    ds = accelerator.state.deepspeed_plugin
    if ds is not None and ds.zero_stage == 3:
        raise ValueError("a KL reference model is not supported under ZeRO-3 yet: use the zero2 "
                         "launcher, or algorithm.kl_coef=0")
    model = load_policy(cfg, dtype, gradient_checkpointing=False, trained=False).model
    return PolicyLogprobs(model).to(accelerator.device).eval().requires_grad_(False)


def tell_deepspeed(accelerator, t: TrainConfig, group_size: int) -> None:
    """Nothing is prepared from a dataloader, so DeepSpeed is told the batch sizes."""
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = t.prompts_per_device * group_size
        ds.deepspeed_config["gradient_accumulation_steps"] = t.grad_accum
        ds.deepspeed_config["gradient_clipping"] = t.max_grad_norm


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over what is trained (with LoRA or a frozen vision tower, not every weight)."""
    return torch.optim.AdamW(trainable_parameters(model), lr=t.learning_rate, betas=t.adam_betas,
                             weight_decay=t.weight_decay)


def eval_rows(task: Task, cfg: Config, say) -> list[Row]:
    """The held-out rows scored during training; none (said once) if the split is unavailable."""
    c = cfg.task
    if not c.eval_split:
        return []
    try:
        rows = list(task.rows(c.eval_split))
    except (KeyError, ValueError, FileNotFoundError) as err:
        say(f"no held-out evaluation: split {c.eval_split!r} unavailable ({err})")
        return []
    return rows[:c.eval_size] if c.eval_size else rows


def drop_long_prompts(rows: list[Row], task: Task, adapter, limit: int) -> tuple[list[Row], int]:
    """Rows whose prompt (image tokens included) fits in `limit` tokens, and how many did not.
    A prompt is never cut: cutting through its image tokens breaks the forward pass. Counted
    from the images' sizes, so nothing is decoded."""
    if limit <= 0:
        return rows, 0
    kept = [row for row in rows if adapter.count_prompt_tokens(task.prompt(row), task.image_sizes(row)) <= limit]
    return kept, len(rows) - len(kept)


def resume_point(accelerator, t: TrainConfig) -> Path | None:
    """The checkpoint to continue from, after finishing or cleaning what a kill interrupted; a
    fresh start over an earlier run's checkpoints is refused."""
    finish_interrupted(accelerator, t.output_dir)
    found = resolve_resume(t.output_dir, t.resume)
    if found is None and list_checkpoints(t.output_dir):
        raise FileExistsError(f"{t.output_dir} holds checkpoints of an earlier run: pass --resume "
                              f"(train.resume=latest) to continue it, or choose another train.output_dir")
    return found



def make_engine(cfg: Config, adapter, task: Task, rows: list[Row], accelerator) -> Engine:
    """The rollout engine rollout.engine names: the training model itself (hf), or a vLLM engine
    in this process (vllm), sized for the most images a prompt of `rows` has."""
    if cfg.rollout.engine == "hf":
        return HFEngine(adapter)
    from gpg_vl.vllm_engine import VLLMEngine

    most = max((images_in(task.prompt(row)) for row in rows), default=0)
    return VLLMEngine(adapter, cfg.model, cfg.rollout, max_images=most, rank=accelerator.process_index,
                      world_size=accelerator.num_processes)


def images_in(prompt: Prompt) -> int:
    """Images of a prompt: its {"type": "image"} parts (one per image, by the task contract)."""
    if isinstance(prompt, str):
        return 0
    return sum(part.get("type") == "image" for message in prompt if not isinstance(message["content"], str)
               for part in message["content"])
