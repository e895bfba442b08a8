"""Checkpoints: written whole or not at all, pruned, stale ones removed, resume finds them."""

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from gpg_vl.checkpoint import DONE_MARKER, clean_interrupted, finish_interrupted, list_checkpoints, resolve_resume, \
    save_checkpoint
from gpg_vl.lora import LoraSettings

ROOT = Path(__file__).resolve().parent.parent


class FakeAccelerator:
    """What save_checkpoint needs of accelerate, writing small files."""

    is_main_process = True
    state = SimpleNamespace(deepspeed_plugin=None)  # no DeepSpeed: the hf/ weights are the model's own

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at
        self.calls = []

    def wait_for_everyone(self):
        self.calls.append("wait")

    def print(self, text):
        self.calls.append(text)

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
    lora = LoraSettings()  # no adapters: hf/ gets the state_dict as it is

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


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


WHOLE = ["COMPLETE", "hf/model.safetensors", "hf/tokenizer.json", "state.bin"]


def test_a_kill_while_pruning_leaves_no_half_checkpoint(tmp_path):
    save(tmp_path, 1, keep=1)
    # Step 2's save prunes step 1; the process is killed once one of step 1's files is deleted.
    code = ("import os, signal, sys; sys.path.insert(0, 'tests'); from test_checkpoint import save\n"
            "removed = []\n"
            "def hook(event, args):\n"
            "    if event == 'os.remove':\n"
            "        removed.append(args)\n"
            "        if len(removed) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
            "sys.addaudithook(hook)\n"
            "save(sys.argv[1], 2, keep=1)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002"]
    assert clean_interrupted(tmp_path) == ["finished deleting step_000001"]  # the next start
    assert [p.name for p in root.iterdir()] == ["step_000002"] and files(root / "step_000002") == WHOLE


def test_an_interrupted_save_is_finished_or_removed_at_the_next_start(tmp_path):
    save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    save(tmp_path, 2)
    (root / "step_000002").rename(root / ".tmp-step_000002")  # killed after its marker, before the rename
    save(tmp_path, 3)
    (root / "step_000003" / DONE_MARKER).unlink()
    (root / "step_000003").rename(root / ".tmp-step_000003")  # killed while writing
    acc = FakeAccelerator()
    finish_interrupted(acc, tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000002"]
    assert files(root / "step_000002") == WHOLE
    assert acc.calls[-1] == "wait" and "finished saving step_000002" in acc.calls[0]
    assert resolve_resume(tmp_path, "latest").name == "step_000002"
