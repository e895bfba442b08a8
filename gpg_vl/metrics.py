"""Step metrics: one JSON line per record, TensorBoard scalars, a console line, a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


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
            self.path.write_text("")
        else:
            truncate_after(self.path, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events at and after it: keep the resumed step's own events.
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=purge)

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
    path.write_text("".join(line + "\n" for line in kept))


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
