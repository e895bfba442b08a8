"""Checkpoints that a crash during a save cannot destroy.

A checkpoint is written whole into `checkpoints/.tmp-step_N`, then renamed to
`checkpoints/step_N` (a rename is atomic on one file system); only then are older
checkpoints pruned. A folder without the completion marker is never resumed from. A pruned
checkpoint is first renamed to `.del-step_N`, then deleted, so that a kill while its files
go leaves no half checkpoint among the complete ones. What a kill interrupts is finished at
the next start (`finish_interrupted`): a save that had written its marker is renamed into
place, a half-written one and a half-deleted one are removed.

Contents: accelerate's state (model, optimizer, every rank's RNG states, the prompt
stream's position, the trainer's counters; DeepSpeed-aware) and, under `hf/`, the model
and processor in Hugging Face format for evaluation or further training (LoRA merged into
the weights); with LoRA also the adapter alone under `adapter/`, in peft's layout.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from pathlib import Path
from typing import Iterator

from gpg_vl.distributed import hf_state_dict, write_run_shape

from gpg_vl.lora import merged_state_dict, save_adapter

DONE_MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP, _TRASH = ".tmp-", ".del-"


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


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder, out of `list_checkpoints`' sight from the first moment."""
    trash = path.with_name(_TRASH + path.name)
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_interrupted(output_dir: str | Path) -> list[str]:
    """Finish what a kill interrupted in the checkpoint folder; what was done, for the log."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    done = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(_TRASH):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"finished deleting {path.name[len(_TRASH):]}")
        elif path.name.startswith(_TMP):
            final = root / path.name[len(_TMP):]
            if (path / DONE_MARKER).exists():  # the save was whole; only the rename was left
                if final.exists():
                    remove_checkpoint(final)
                path.rename(final)
                done.append(f"finished saving {final.name}")
            else:
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed the unfinished {final.name}")
    return done


def finish_interrupted(accelerator, output_dir: str | Path) -> None:
    """`clean_interrupted` on the main process, before any rank looks for a checkpoint."""
    if accelerator.is_main_process:
        for line in clean_interrupted(output_dir):
            accelerator.print(f"checkpoints: {line} (interrupted by the last run's end)")
    accelerator.wait_for_everyone()


class _TiedWeightsNote(logging.Filter):
    """Drops accelerate's note that it saved a tensor once under two names when those names
    are the model's tied input and output embeddings (Qwen2-VL-2B ties them; from_pretrained
    ties them again): true at every save of such a model, so it says nothing."""

    def __init__(self, tied: set[str]):
        super().__init__()
        self.tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Removed shared tensor" not in message:  # accelerate prefixes its messages with the rank
            return True
        removed = set(re.findall(r"'([^']+)'", message.split(" while saving")[0]))
        return not (removed and removed <= self.tied)


@contextlib.contextmanager
def _quiet_about_tied_weights(model) -> Iterator[None]:
    """`model` (or the Hugging Face model inside it) saved without the tied-weights note."""
    modules = model.modules() if hasattr(model, "modules") else []
    hf = next((m for m in modules if hasattr(m, "get_input_embeddings")), None)
    embeddings = hf.get_input_embeddings().weight if hf is not None else None
    tied = {n for n, p in model.named_parameters(remove_duplicate=False) if p is embeddings} if hf is not None else set()
    note = _TiedWeightsNote(tied)
    log = logging.getLogger("accelerate.utils.other")
    log.addFilter(note)
    try:
        yield
    finally:
        log.removeFilter(note)


def save_checkpoint(accelerator, model, adapter, output_dir: str | Path, step: int, keep: int,
                    shape: dict | None = None) -> Path:
    """Write step_N atomically on the main process's file system; every rank must call this.
    `shape`: the run's shape, recorded for the check at resume (gpg_vl.distributed.run_shape)."""
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"{_TMP}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _quiet_about_tied_weights(accelerator.unwrap_model(model)):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's files written before the marker says complete
    state_dict = hf_state_dict(accelerator, model)  # gathered under ZeRO-3 (a collective), else None
    if accelerator.is_main_process:
        if adapter.lora.enabled and state_dict is None:  # LoRA is merged from the whole weights, held here
            state_dict = adapter.model.state_dict()
        adapter.model.save_pretrained(tmp / "hf", state_dict=merged_state_dict(state_dict, adapter.lora),
                                      safe_serialization=True)
        if adapter.lora.enabled:
            save_adapter(adapter.model, state_dict, tmp / "adapter", adapter.model.name_or_path)
        adapter.save_processor(tmp / "hf")
        if shape is not None:
            write_run_shape(tmp, shape)
        (tmp / DONE_MARKER).write_text(f"{step}\n")
        if final.exists():  # a checkpoint of the same step from an earlier, abandoned run
            remove_checkpoint(final)
        tmp.rename(final)
        # Newer checkpoints belong to a run that was resumed from an earlier point: stale.
        done = list_checkpoints(output_dir)
        stale = [p for p in done if checkpoint_step(p) > step]
        for old in stale + [p for p in done if checkpoint_step(p) <= step][:-keep]:
            remove_checkpoint(old)
    accelerator.wait_for_everyone()
    return final
