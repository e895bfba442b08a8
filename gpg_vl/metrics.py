"""Step metrics: one JSON line per record, TensorBoard scalars, a console line, a PNG plot.

A resumed run first drops what the killed run logged after its checkpoint. Every file is
rewritten aside and then renamed over the old one, so a kill at any moment leaves the old
history or the new one whole; the TensorBoard folder is compacted into one file holding each
(tag, step) once, so that the resumed run's steps are not shown twice.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
EVENTS_GLOB = "events.out.tfevents.*"


class MetricsLogger:
    """Writes on the main process only; other ranks get a logger that does nothing."""

    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            rewrite(self.path, "")
        else:
            truncate_after(self.path, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            folder = Path(output_dir) / TENSORBOARD_DIR
            compact_events(folder, resume_step)
            self._tb = SummaryWriter(str(folder))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _clean(v):
    return round(v, 6) if isinstance(v, float) and math.isfinite(v) else v


def rewrite(path: Path, text: str) -> None:
    """Replace the file's contents atomically: written aside, synced, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def truncate_after(path: Path, step: int) -> None:
    """Drop records past `step` (written by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):  # a line torn by the crash
            continue
    rewrite(path, "".join(line + "\n" for line in kept))


def read_scalars(folder: Path, last_step: int) -> dict[tuple[str, int], tuple[float, object]]:
    """(tag, step) -> (wall time, summary value) of every scalar at or before `last_step` in the
    event files; where a step was logged twice (a run resumed before), the later one."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    latest: dict[tuple[str, int], tuple[float, object]] = {}
    for file in sorted(folder.glob(EVENTS_GLOB)):
        for record in RawEventFileLoader(str(file)).Load():  # a record torn by a kill ends the file
            event = Event.FromString(record)
            if not event.HasField("summary") or event.step > last_step:
                continue
            for value in event.summary.value:
                key = (value.tag, event.step)
                if key not in latest or event.wall_time >= latest[key][0]:
                    latest[key] = (event.wall_time, value)
    return latest


def compact_events(folder: Path, last_step: int | None) -> None:
    """Leave in `folder` one event file holding each scalar (tag, step) once, for the steps up
    to `last_step` (None: a fresh run, nothing kept). It is written aside and renamed in, then
    the old files are deleted: a kill in between leaves copies that the next start compacts."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    old = sorted(folder.glob(EVENTS_GLOB))
    aside = folder / ".compacting"
    shutil.rmtree(aside, ignore_errors=True)
    kept = read_scalars(folder, last_step) if old and last_step is not None else {}
    target = None
    if kept:
        writer = EventFileWriter(str(aside))
        for (tag, step), (wall, value) in sorted(kept.items(), key=lambda kv: (kv[0][1], kv[1][0])):
            writer.add_event(Event(wall_time=wall, step=step, summary=Summary(value=[value])))
        writer.close()
        # Named by the run's first wall time, so that it sorts before the file the run goes on writing.
        target = folder / f"events.out.tfevents.{int(min(w for w, _ in kept.values())):010d}.compacted"
        (written,) = aside.glob(EVENTS_GLOB)
        os.replace(written, target)
    for file in old:
        if file != target:
            file.unlink()
    shutil.rmtree(aside, ignore_errors=True)


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def format_line(step: int, m: dict[str, float]) -> str:
    parts = [f"step {step:>4}", f"reward {m['reward/mean']:.3f}"]
    parts += [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in m.items() if k.startswith("reward/") and k != "reward/mean"
              and k != "reward/std"]
    parts += [f"valid {m['valid_fraction']:.2f}", f"1/alpha {m['inverse_alpha']:.2f}",
              f"rounds {m['resample_rounds']}", f"loss {m['loss']:+.4f}", f"{m['step_time']:.2f}s"]
    return " | ".join(parts)


def plot_curves(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Reward and accuracy (training and held-out) against optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "reward/mean" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["reward/mean"] for r in train], label="training reward", alpha=0.8)
    if train and "reward/accuracy" in train[0]:
        ax.plot([r["step"] for r in train], [r["reward/accuracy"] for r in train], label="training accuracy",
                alpha=0.8)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval/accuracy"] for r in evals], "o-",
                label="held-out greedy accuracy")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("value")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
