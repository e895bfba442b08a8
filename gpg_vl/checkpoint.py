"""Checkpoints that a crash during a save cannot destroy.

A checkpoint is written whole into `checkpoints/.tmp-step_N`, then renamed to
`checkpoints/step_N` (a rename is atomic on one file system); only then are older
checkpoints pruned. A folder without the completion marker is never resumed from.

Contents: accelerate's state (model, optimizer, every rank's RNG states, the prompt
stream's position, the trainer's counters; DeepSpeed-aware) and, under `hf/`, the model
and processor in Hugging Face format for evaluation or further training (LoRA merged into
the weights); with LoRA also the adapter alone under `adapter/`, in peft's layout.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from gpg_vl.lora import merged_state_dict, save_adapter

DONE_MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_step(path: Path) -> int:
    return int(_STEP_RE.match(path.name).group(1))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_RE.match(p.name)) and (p / DONE_MARKER).exists()]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | Path, resume: str) -> Path | None:
    """'latest' -> newest complete checkpoint (None if there is none); a path -> that folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / DONE_MARKER).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {DONE_MARKER} marker); "
                                f"complete ones: {[str(p) for p in list_checkpoints(output_dir)]}")
    return path


def save_checkpoint(accelerator, model, adapter, output_dir: str | Path, step: int, keep: int) -> Path:
    """Write step_N atomically on the main process's file system; every rank must call this."""
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # The trained module wraps the Hugging Face model (gpg_vl.models.policy): its keys start "model.".
    state_dict = {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(model).items()}
    if accelerator.is_main_process:
        adapter.model.save_pretrained(tmp / "hf", state_dict=merged_state_dict(state_dict, adapter.lora),
                                      safe_serialization=True)
        if adapter.lora.enabled:
            save_adapter(adapter.model, state_dict, tmp / "adapter", adapter.model.name_or_path)
        adapter.save_processor(tmp / "hf")
        (tmp / DONE_MARKER).write_text(f"{step}\n")
        if final.exists():  # a checkpoint of the same step from an earlier, abandoned run
            shutil.rmtree(final)
        tmp.rename(final)
        # Newer checkpoints belong to a run that was resumed from an earlier point: stale.
        done = list_checkpoints(output_dir)
        stale = [p for p in done if checkpoint_step(p) > step]
        for old in stale + [p for p in done if checkpoint_step(p) <= step][:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
