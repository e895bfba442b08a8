"""What running on several processes needs beyond the loop itself.

- the process group: its backend where accelerate picks none, and the collective timeout;
- DeepSpeed ZeRO-3: bucket sizes that really shard the model, generation with the weights
  gathered once per call, a frozen reference model sharded like the policy, the full
  weights for the hf/ folder.

The rank balancing of the groups of a step is in gpg_vl.balance.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch


# ---------------------------------------------------------------- process group


def process_group_kwargs(timeout_s: float):
    """The Accelerator's process-group settings: every collective gives up after `timeout_s`.

    gloo is named where several processes run without an accelerator: with a DeepSpeed
    config and no CUDA, accelerate 1.15 picks no backend, so each process would believe it
    is alone (num_processes 1) while DeepSpeed forms a group of all. Elsewhere the backend
    is left to accelerate (the dataclass default, nccl, is never passed on). In a single
    process no backend may be named (accelerate would ask torch.distributed for a group).
    """
    from accelerate.utils import InitProcessGroupKwargs

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    backend = "gloo" if several and not torch.accelerator.is_available() else "nccl"
    return InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=timeout_s))


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage, 0 without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin.zero_stage if plugin is not None else 0


# ---------------------------------------------------------------- ZeRO-3


def size_zero3_buckets(zero: dict, model_config) -> None:
    """The ZeRO-3 sizes that the Hugging Face Trainer's "auto" gives, from the text model's
    hidden size h: parameters under 10 h elements stay whole on every rank, the others are
    sharded. DeepSpeed's own default (1e5 elements) keeps a small model whole: it is then
    not sharded at all. accelerate's "auto" reads only a top-level hidden_size, which a
    Qwen-VL config lacks. Values set in the config (other than "auto") stay."""
    h = model_config.get_text_config().hidden_size
    sizes = {"stage3_param_persistence_threshold": 10 * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
             "reduce_bucket_size": h * h}
    for key, value in sizes.items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value


def generation_context(accelerator, model):
    """Under ZeRO-3, the sharded weights gathered once for a whole generation call, with
    DeepSpeed's per-module hooks taken off meanwhile and put back after. Inside a plain
    GatheredParameters the hooks still run for every module at every token, and above
    their reuse limits (every real model) release and re-gather each layer per token. With
    the hooks off no forward is a collective, so each rank stops decoding when its own
    completions end. Entering and leaving are collectives: every rank enters equally often."""
    if zero_stage(accelerator) == 3:
        from deepspeed.runtime.zero import unwrap_model_for_generation

        return unwrap_model_for_generation(model)
    return contextlib.nullcontext()


def zero3_reference(model: torch.nn.Module, train_config: dict):
    """A frozen model sharded by ZeRO-3 like the policy, in a DeepSpeed engine without an
    optimizer: its forward gathers each layer as it runs (a collective: every rank calls it
    equally often, as the trainer's micro-batch loop does). `train_config` is the policy's
    DeepSpeed config after accelerate prepared it."""
    import copy

    import deepspeed

    config = copy.deepcopy(train_config)
    for key in ("optimizer", "scheduler", "zero_allow_untested_optimizer"):
        config.pop(key, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeedEngine.eval returns None, unlike Module.eval
    return engine


def hf_state_dict(accelerator, model) -> dict | None:
    """The trained weights for save_pretrained, with the Hugging Face model's own names;
    None where the model's own parameters already hold them whole (one process, DDP,
    ZeRO-1/2: its get_state_dict would clone them and untie a tied lm_head). Under ZeRO-3
    a collective: every rank calls it; only the main process gets the dict."""
    if zero_stage(accelerator) != 3:
        return None
    full = accelerator.get_state_dict(model)
    if full is None:
        return None
    # The trained module wraps the Hugging Face model (gpg_vl.models.policy): its keys start "model.".
    return {k.removeprefix("model."): v for k, v in full.items()}


def keep_used_conversions(model: torch.nn.Module) -> None:
    """transformers 5.23, loading under ZeRO-3, keeps every checkpoint renaming rule of the
    family, matched or not, and save_pretrained reverses them all (hf/ names such as
    `model.model.layers.*`). Keep the rules that matched, as a load without ZeRO-3 does, so
    that hf/ has the checkpoint's own names. A private attribute: pinned in constraints.txt
    and tested (tests/test_zero.py)."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if c.was_used()]
