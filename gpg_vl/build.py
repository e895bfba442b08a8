"""What a training run is made of, built from its config: the accelerator, the policy and its
optimizer, the task's rows, an optional reference model, the resume point.

Each function does one job; the trainer calls them in order and keeps what they return.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpg_vl import distributed
from gpg_vl.checkpoint import finish_interrupted, list_checkpoints, resolve_resume
from gpg_vl.config import Config, TrainConfig
from gpg_vl.evaluation import Part
from gpg_vl.lora import configure_training, trainable_parameters
from gpg_vl.models.base import image_count
from gpg_vl.models.policy import PolicyLogprobs
from gpg_vl.rollout import Engine, HFEngine
from gpg_vl.task import Row, Task
from gpg_vl.trackers import require_installed


def make_accelerator(t: TrainConfig):
    from accelerate import Accelerator

    mixed = t.mixed_precision if t.mixed_precision != "auto" else ("bf16" if torch.cuda.is_available() else "no")
    require_installed(t.report_to)
    return Accelerator(gradient_accumulation_steps=t.grad_accum, mixed_precision=mixed,
                       log_with=list(t.report_to) or None, project_dir=t.output_dir,
                       kwargs_handlers=[distributed.process_group_kwargs(t.dist_timeout_s)])


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
    distributed.keep_used_conversions(adapter.model)  # hf/ keeps the checkpoint's names under ZeRO-3 too
    if trained:
        configure_training(adapter.model, m.lora, m.freeze_vision_tower)
        adapter.lora = m.lora
    return adapter


def load_reference(cfg: Config, accelerator, dtype: str) -> PolicyLogprobs | None:
    """The frozen reference of GRPO's KL term, only when one is asked for (never for GPG).
    Loaded after the policy was prepared: under ZeRO-3 it is then born sharded and goes into
    a DeepSpeed inference engine with the policy's config; elsewhere each rank holds it whole."""
    a = cfg.algorithm
    if a.name == "gpg" or a.kl_coef <= 0:
        return None
    reference = PolicyLogprobs(load_policy(cfg, dtype, gradient_checkpointing=False, trained=False).model)
    if distributed.zero_stage(accelerator) == 3:
        return distributed.zero3_reference(reference, accelerator.state.deepspeed_plugin.deepspeed_config)
    return reference.to(accelerator.device).eval().requires_grad_(False)


def tell_deepspeed(accelerator, t: TrainConfig, group_size: int, model_config) -> None:
    """Nothing is prepared from a dataloader, so DeepSpeed is told the batch sizes (and, under
    ZeRO-3, bucket sizes that shard the model: gpg_vl.distributed.size_zero3_buckets)."""
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = t.prompts_per_device * group_size
        ds.deepspeed_config["gradient_accumulation_steps"] = t.grad_accum
        ds.deepspeed_config["gradient_clipping"] = t.max_grad_norm
        if ds.zero_stage == 3:
            distributed.size_zero3_buckets(ds.deepspeed_config["zero_optimization"], model_config)


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over what is trained (with LoRA or a frozen vision tower, not every weight)."""
    return torch.optim.AdamW(trainable_parameters(model), lr=t.learning_rate, betas=t.adam_betas,
                             weight_decay=t.weight_decay)


def eval_part(task: Task, cfg: Config, adapter, say) -> tuple[Part | None, int]:
    """The held-out rows evaluated during training, task.eval_size of task.eval_split of the
    evaluated task (the training task itself unless eval.task names another, such as cvbench
    for sat), prompts over rollout.max_prompt_tokens left out; and how many were. None (said
    once) when there is no such split."""
    from gpg_vl.evaluation import EvalError, build_evaluated, evaluated_task_config, load_part

    split = cfg.task.eval_split
    if not split:
        return None, 0
    config = evaluated_task_config(cfg)
    evaluated = task if config == cfg.task else build_evaluated(config)
    try:
        part = load_part(config, split, split, cfg.task.eval_size, evaluated)
    except EvalError as err:
        say(f"no held-out evaluation: {err}")
        return None, 0
    rows, too_long = drop_long_prompts(part.rows, part.task, adapter, cfg.rollout.max_prompt_tokens)
    return part._replace(rows=rows), too_long


def drop_long_prompts(rows: list[Row], task: Task, adapter, limit: int) -> tuple[list[Row], int]:
    """Rows whose prompt (image tokens included) fits in `limit` tokens, and how many did not.
    A prompt is never cut: cutting through its image tokens breaks the forward pass. Counted
    from the images' sizes, so nothing is decoded."""
    if limit <= 0:
        return rows, 0
    kept = [row for row in rows if adapter.count_prompt_tokens(task.prompt(row), task.image_sizes(row)) <= limit]
    return kept, len(rows) - len(kept)


def resume_point(accelerator, t: TrainConfig, shape: dict) -> Path | None:
    """The checkpoint to continue from, after finishing or cleaning what a kill interrupted; a
    fresh start over an earlier run's checkpoints, or a resume by a run of another shape
    (gpg_vl.distributed.run_shape), is refused."""
    finish_interrupted(accelerator, t.output_dir)
    found = resolve_resume(t.output_dir, t.resume)
    if found is None and list_checkpoints(t.output_dir):
        raise FileExistsError(f"{t.output_dir} holds checkpoints of an earlier run: pass --resume "
                              f"(train.resume=latest) to continue it, or choose another train.output_dir")
    if found is not None:
        distributed.check_run_shape(found, shape)
    return found


def make_engine(cfg: Config, adapter, task: Task, rows: list[Row], eval_part: Part | None, accelerator) -> Engine:
    """The rollout engine rollout.engine names: the training model itself (hf), or a vLLM engine
    in this process (vllm), sized for the most images a prompt has (training `rows` of `task`,
    and the held-out rows of the evaluated task)."""
    if cfg.rollout.engine == "hf":
        return HFEngine(adapter)
    from gpg_vl.vllm_engine import VLLMEngine

    prompts = [task.prompt(row) for row in rows]
    if eval_part is not None:
        prompts += [eval_part.task.prompt(row) for row in eval_part.rows]
    most = max(map(image_count, prompts), default=0)
    return VLLMEngine(adapter, cfg.model, cfg.rollout, max_images=most, rank=accelerator.process_index,
                      world_size=accelerator.num_processes)
