"""Checkpoints: written whole or not at all, pruned, stale ones removed, resume finds them."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from gpg_vl.checkpoint import DONE_MARKER, list_checkpoints, resolve_resume, save_checkpoint


class FakeAccelerator:
    """What save_checkpoint needs of accelerate, writing small files."""

    is_main_process = True
    state = SimpleNamespace(deepspeed_plugin=None)  # no DeepSpeed: the hf/ weights are the model's own

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        if self.fail_at is not None and Path(folder).name.endswith(f"{self.fail_at:06d}"):
            raise OSError("disk full")
        (Path(folder) / "state.bin").write_text("state")

    def get_state_dict(self, model):
        return {}

    def unwrap_model(self, model):
        return model


class FakeModel:
    def save_pretrained(self, folder, state_dict=None, safe_serialization=True):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_text("weights")


class FakeAdapter:
    model = FakeModel()

    def save_processor(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{}")


def save(out, step, keep=2, acc=None):
    return save_checkpoint(acc or FakeAccelerator(), None, FakeAdapter(), out, step, keep)


def test_keeps_the_newest_and_marks_them_complete(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_000002", "step_000003"]
    assert (tmp_path / "checkpoints" / "step_000003" / DONE_MARKER).exists()
    assert (tmp_path / "checkpoints" / "step_000003" / "hf" / "tokenizer.json").exists()
    assert resolve_resume(tmp_path, "latest").name == "step_000003"


def test_a_crash_during_a_save_leaves_the_last_good_checkpoint(tmp_path):
    save(tmp_path, 1)
    with pytest.raises(OSError):
        save(tmp_path, 2, acc=FakeAccelerator(fail_at=2))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"]
    assert resolve_resume(tmp_path, "latest").name == "step_000001"


def test_resuming_from_an_earlier_checkpoint_removes_the_later_stale_ones(tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step, keep=5)
    save(tmp_path, 3, keep=5)  # a run resumed from step 2 reaches step 3
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]


def test_an_incomplete_folder_is_refused(tmp_path):
    folder = tmp_path / "checkpoints" / "step_000009"
    folder.mkdir(parents=True)
    assert resolve_resume(tmp_path, "latest") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(folder))
