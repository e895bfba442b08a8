"""The metrics files at a resume: nothing lost to a kill during the rewrite, each TensorBoard step once."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpg_vl.metrics import EVENTS_GLOB, MetricsLogger, compact_events, read_metrics, truncate_after

ROOT = Path(__file__).resolve().parent.parent


def history(path: Path, steps: int) -> str:
    lines = [json.dumps({"step": s, "loss": s / 10, "note": "x" * 60}) for s in range(steps)]
    return "".join(line + "\n" for line in lines) + '{"step": 9, "lo'  # the last line torn by a kill


def test_truncate_keeps_the_steps_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(history(path, 9))
    truncate_after(path, 6)
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3, 4, 5, 6]


def test_a_kill_during_the_rewrite_loses_no_history(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(history(path, 9))
    before = path.read_text()
    # The kernel kills the process (SIGXFSZ, Python's ignoring of it undone) at the first byte it
    # writes past 200 into any file: in the middle of writing the kept steps 0-6 (about 570 bytes).
    code = ("import resource, signal, sys; from pathlib import Path; from gpg_vl.metrics import truncate_after; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_DFL); resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200)); "
            "truncate_after(Path(sys.argv[1]), 6)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == -signal.SIGXFSZ, done.stderr.decode()[-2000:]
    assert path.read_text() == before  # the whole history, torn last line included
    truncate_after(path, 6)  # the next start does the rewrite again, whole
    assert [r["step"] for r in read_metrics(path)] == list(range(7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # the aside file was replaced


def scalars(folder: Path) -> list[tuple[str, int, float]]:
    """Every scalar in the folder's event files, in the order TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    found = []
    for file in sorted(folder.glob(EVENTS_GLOB)):
        for record in RawEventFileLoader(str(file)).Load():
            event = Event.FromString(record)
            found += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return found


def log_steps(out: Path, steps, resume_step=None, scale=1.0) -> None:
    logger = MetricsLogger(out, enabled=True, tensorboard=True, resume_step=resume_step)
    for s in steps:
        logger.log(s, {"loss": s * scale, "reward/mean": -s * scale})
    logger.close()


def test_tensorboard_holds_each_step_once_after_a_resume(tmp_path):
    log_steps(tmp_path, range(1, 8))  # a run killed after step 7, its last checkpoint at step 5
    log_steps(tmp_path, range(6, 10), resume_step=5, scale=10.0)
    got = scalars(tmp_path / "tensorboard")
    steps = [s for tag, s, _ in got if tag == "loss"]
    assert steps == list(range(1, 10))  # once each, in order: no "out of order event.step"
    values = {(tag, s): v for tag, s, v in got}
    assert values[("loss", 5)] == 5.0 and values[("loss", 6)] == 60.0  # the resumed run's steps 6, 7
    assert values[("reward/mean", 9)] == -90.0
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_an_interrupted_compaction_is_finished_at_the_next_start(tmp_path):
    log_steps(tmp_path, range(1, 8))
    folder = tmp_path / "tensorboard"
    # The state a kill leaves between renaming the compacted file in and deleting the old ones.
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    compact_events(copy, 5)
    for file in copy.glob(EVENTS_GLOB):
        shutil.copy(file, folder)
    (folder / ".compacting").mkdir()  # and a half-written file aside
    assert len(list(folder.glob(EVENTS_GLOB))) == 2
    log_steps(tmp_path, range(6, 8), resume_step=5, scale=10.0)
    assert [(s, v) for tag, s, v in scalars(folder) if tag == "loss"] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 60.0), (7, 70.0)]
    assert not (folder / ".compacting").exists()


def test_a_fresh_run_starts_a_fresh_tensorboard_log(tmp_path):
    log_steps(tmp_path, range(1, 4))
    log_steps(tmp_path, range(1, 3), scale=2.0)
    assert [(s, v) for tag, s, v in scalars(tmp_path / "tensorboard") if tag == "loss"] == [(1, 2.0), (2, 4.0)]


@pytest.mark.parametrize("resume_step", [None, 3])
def test_a_logger_on_another_rank_touches_nothing(tmp_path, resume_step):
    logger = MetricsLogger(tmp_path, enabled=False, tensorboard=True, resume_step=resume_step)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert list(tmp_path.iterdir()) == []
