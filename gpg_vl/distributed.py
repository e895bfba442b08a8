"""What running on several processes needs beyond the loop itself.

- the process group: its backend where accelerate picks none, and the collective timeout;
- DeepSpeed ZeRO-3: bucket sizes that really shard the model, generation with the weights
  gathered once per call, a frozen reference model sharded like the policy, the full
  weights for the hf/ folder;
- the run's shape (world size, batch shape, engine), recorded in each checkpoint and
  compared at resume;
- a watchdog: each rank's phase in a status file kept fresh by a heartbeat, so that a rank
  whose collective fails or times out says which rank stopped answering and where.

The rank balancing of the groups of a step is in gpg_vl.balance.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch

from gpg_vl.config import ConfigError

SHAPE_FILE = "run_shape.json"


# ---------------------------------------------------------------- process group and engine


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


def engine_name(accelerator) -> str:
    """ddp (one process or torch data parallel), zero1..zero3, with +offload_optimizer / +offload_param."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return "ddp"
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    offloaded = [key for key in ("offload_optimizer", "offload_param")
                 if str(zero.get(key, {}).get("device", "none")).lower() not in ("none", "")]
    return f"zero{plugin.zero_stage}" + "".join(f"+{key}" for key in offloaded)


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
    and tested (tests/test_launchers.py: the hf/ folder of a ZeRO-3 run)."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if c.was_used()]


# ---------------------------------------------------------------- the run's shape


def run_shape(accelerator, prompts_per_device: int, grad_accum: int, group_size: int) -> dict:
    """What a checkpoint's optimizer shards, every rank's random state and the data position
    depend on: a resume of another shape would not continue the same run."""
    return {"world_size": accelerator.num_processes, "prompts_per_device": prompts_per_device,
            "grad_accum": grad_accum, "group_size": group_size, "engine": engine_name(accelerator),
            "mixed_precision": str(accelerator.mixed_precision)}


def write_run_shape(folder: Path, shape: dict) -> None:
    (folder / SHAPE_FILE).write_text(json.dumps(shape, indent=1) + "\n")


def check_run_shape(folder: Path, shape: dict) -> None:
    """Refuse a resume from `folder` by a run of another shape, saying what differs. A
    checkpoint without the record (written before it existed) is accepted."""
    path = folder / SHAPE_FILE
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    differ = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in shape.items() if saved.get(k) != v]
    if differ:
        raise ConfigError(f"cannot resume from {folder}: it was made by a run of another shape ({'; '.join(differ)}). "
                          "Resume with the checkpoint's settings and launcher, or start a new run (another "
                          "train.output_dir) from its hf/ weights (model.path)")


# ---------------------------------------------------------------- the watchdog


class RankStopped(RuntimeError):
    """A phase of a multi-process run failed; the message says what every rank last reported."""


class Watchdog:
    """Each rank's phase and step in `folder`/rank{r}.status, rewritten every few seconds by a
    daemon thread. A rank waiting in a collective keeps beating; a dead or stopped one does
    not, and its file goes stale. When a phase fails on a rank (a collective times out
    after `timeout_s`, a peer's connection closes), the error is re-raised as RankStopped,
    naming this rank, the phase and the status of every rank.

    The folder must be on a file system all machines share (train.output_dir already must
    be, for checkpoints); where it is not, the report says it found no status file."""

    def __init__(self, folder: Path, rank: int, world: int, timeout_s: float):
        self.folder, self.rank, self.world, self.timeout_s = Path(folder), rank, world, timeout_s
        self.every = max(0.5, min(5.0, timeout_s / 4))  # heartbeat period, seconds
        self.stale_after = 2.5 * self.every
        self.status = {"rank": rank, "phase": "setup", "step": 0, "since": time.time()}
        self._lock = threading.Lock()
        if world > 1:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write()
            threading.Thread(target=self._beat, name="gpg-vl-heartbeat", daemon=True).start()

    def _file(self, rank: int) -> Path:
        return self.folder / f"rank{rank}.status"

    def _write(self) -> None:
        with self._lock:
            record = {**self.status, "alive": time.time()}
            tmp = self._file(self.rank).with_suffix(".status.tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(self._file(self.rank))

    def _beat(self) -> None:
        while True:
            time.sleep(self.every)
            try:
                self._write()
            except OSError:  # the folder went away (a test's tmp dir, a full disk): try again next beat
                pass

    @contextlib.contextmanager
    def phase(self, name: str, step: int):
        with self._lock:
            self.status.update(phase=name, step=step, since=time.time())
        if self.world == 1:
            yield
            return
        self._write()
        start = time.perf_counter()
        try:
            yield
        except RankStopped:  # reported by an inner phase already
            raise
        except Exception as err:
            head = (f"rank {self.rank} stopped in phase {name!r} of step {step} after "
                    f"{time.perf_counter() - start:.1f} s (train.dist_timeout_s={self.timeout_s:g}): "
                    f"{type(err).__name__}: {str(err)[:400]}")
            if time.perf_counter() - start < self.stale_after:
                # A peer's connection closed at once. Say so now (the launcher may end this process
                # any moment), then let a dead peer's status go stale, so the report tells it from the living.
                print(f"{head}\nwaiting {self.stale_after:g} s to tell stopped ranks from living ones; "
                      f"{self.report(verdicts=False)}", file=sys.stderr, flush=True)
                time.sleep(self.stale_after)
            raise RankStopped(f"{head}\n{self.report()}") from err

    def report(self, verdicts: bool = True) -> str:
        """Each rank's last status; with `verdicts`, whether its heartbeat is fresh (alive) or stale."""
        lines, now = [], time.time()
        for r in range(self.world):
            try:
                other = json.loads(self._file(r).read_text())
            except (OSError, ValueError):
                lines.append(f"  rank {r}: no status file (it never started, or {self.folder} is not shared)")
                continue
            silent = now - other["alive"]
            verdict = "NOT RESPONDING (dead or stopped), " if silent > self.stale_after else "alive, "
            verdict = verdict if verdicts else ""
            lines.append(f"  rank {r}: {verdict}last seen {silent:.0f} s ago in phase {other['phase']!r} of step "
                         f"{other['step']} (entered {now - other['since']:.0f} s ago)")
        return "status of each rank:\n" + "\n".join(lines)
