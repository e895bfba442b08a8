"""Experiment trackers through accelerate's tracking (`train.report_to`), and the table of
sample completions (`train.log_samples_every`).

metrics.jsonl (gpg_vl/metrics.py) is always written; the trackers get the same records. The
table holds, every N steps, some of the step's groups: each completion with its prompt, its
reward and every reward component, appended to samples.jsonl and logged as a table to the
trackers that take tables (wandb). Offline runs need nothing here: wandb reads WANDB_MODE
(offline: files under output_dir/wandb, `wandb sync` later), swanlab its SWANLAB_MODE.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from gpg_vl.metrics import truncate_after

SAMPLES_FILE = "samples.jsonl"
# accelerate's tracker names (accelerate.tracking), and what each needs installed.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "swanlab": "swanlab", "mlflow": "mlflow",
            "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "trackio": "trackio"}


def check_report_to(report_to: list[str], own_tensorboard: bool) -> list[str]:
    """What is wrong with train.report_to (empty: nothing)."""
    problems = [f"train.report_to: unknown tracker {name!r}; known: {', '.join(TRACKERS)}"
                for name in report_to if name not in TRACKERS]
    if "tensorboard" in report_to and own_tensorboard:
        problems.append("train.report_to has tensorboard and train.tensorboard is true: the events would be written "
                        "twice; set train.tensorboard=false to log TensorBoard through accelerate")
    return problems


def require_installed(report_to: list[str]) -> None:
    """A clear error before training for a tracker whose package is missing."""
    import importlib.util

    missing = [name for name in report_to if importlib.util.find_spec(TRACKERS[name]) is None]
    if missing:
        raise ModuleNotFoundError(f"train.report_to names {', '.join(missing)}, not installed here: pip install "
                                  f"{' '.join(TRACKERS[m] for m in missing)}")


def start(accelerator, cfg_dict: dict, output_dir: str, run_name: str) -> None:
    """Open a run in each tracker accelerate was given (log_with), the config as its settings."""
    if not accelerator.log_with:
        return
    init = {"wandb": {"dir": output_dir, "name": run_name}, "swanlab": {"logdir": str(Path(output_dir) / "swanlab"),
                                                                        "experiment_name": run_name}}
    accelerator.init_trackers("gpg-vl", config=flat_config(cfg_dict),
                              init_kwargs={k: v for k, v in init.items() if k in tracker_names(accelerator)})


def tracker_names(accelerator) -> list[str]:
    return [str(getattr(t, "value", t)) for t in accelerator.log_with]


def flat_config(cfg: dict, prefix: str = "") -> dict:
    """{'train': {'seed': 0}} -> {'train.seed': 0}; lists and the like as strings (what trackers take)."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
    return out


def log(accelerator, step: int, metrics: dict[str, float]) -> None:
    if accelerator.log_with:
        accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
                        step=step)


def finish(accelerator) -> None:
    """Close each tracker's run. Not accelerator.end_training(): that also destroys the process
    group, which an in-process vLLM engine and a later run in the same process still use."""
    for tracker in accelerator.trackers:
        tracker.finish()


def sample_rows(step: int, groups, texts: list[list[str]], components: tuple[str, ...]) -> list[dict]:
    """One row per completion of `groups` (texts[i]: group i's decoded completions)."""
    rows = []
    for group, completions in zip(groups, texts):
        for j, completion in enumerate(completions):
            row = {"step": step, "prompt": group.prompt.text, "completion": completion,
                   "reward": float(group.rewards[j])}
            row.update({name: float(group.components[name][j]) for name in components})
            rows.append(row)
    return rows


class SamplesLog:
    """samples.jsonl (main process) and the trackers' tables; a resumed run drops the rows
    past its checkpoint, as metrics.jsonl does."""

    def __init__(self, output_dir: str, enabled: bool, resume_step: int | None):
        self.path = Path(output_dir) / SAMPLES_FILE
        self.enabled = enabled
        if enabled:
            if resume_step is None:
                self.path.write_text("")
            else:
                truncate_after(self.path, resume_step)

    def write(self, accelerator, rows: list[dict]) -> None:
        if not (self.enabled and rows):
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        columns = list(rows[0])
        for tracker in accelerator.trackers:
            if hasattr(tracker, "log_table"):  # accelerate's wandb and clearml trackers take tables
                tracker.log_table("samples", columns=columns, data=[[r[c] for c in columns] for r in rows],
                                  step=rows[0]["step"])

