"""The paper in miniature: GPG against GRPO and Dr. GRPO, and GPG's ablations, on a CPU.

    python scripts/compare.py                 # the full comparison, about 30 minutes on 2 cores
    python scripts/compare.py --quick         # one seed, one model, the main arms: a few minutes
    python scripts/compare.py --tasks mini_count --arms gpg grpo --seeds 1   # a subset

Every run trains a tiny random-init model (the preset miniature) on one of the
synthetic tasks of gpg_vl/tasks/miniature.py, one per reward kind of the paper, for the same
budget of generated completions: the same prompts in the same order and the same seeds for
every arm. The main arms (gpg, grpo, dr_grpo) run on both tiny models; GPG's ablations
(F_norm = std, alpha off, beta_th 0 and 0.6) on the tiny Qwen2-VL. Runs go one after
another on each of --jobs worker processes, under one progress bar.

Written to --out (default runs/compare, or runs/compare_quick):
  runs/<model>/<task>/<arm>/seed<k>/  each run's metrics.jsonl, config.yaml and log.txt;
  raw.jsonl    one line per run and step: budget used, training reward, valid-group fraction,
               resampling rounds, wall time, and the held-out score where it was measured;
  table.md     final held-out score per arm and task, then per model, task and arm: final
               held-out score, samples to reach the task's threshold, training reward over
               the last tenth of the budget, valid-group fraction, resampling rounds per step
               and wall time (mean +- std over seeds);
  curves.png   held-out score against generated samples, mean and min-max over seeds.
A rerun with the same --out skips the runs that finished with the same settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from gpg_vl.resources import PRESETS

ROOT = Path(__file__).resolve().parent.parent
PRESET = PRESETS / "miniature.yaml"
MODELS = {"qwen2_vl": "tiny:qwen2_vl", "qwen2_5_vl": "tiny:qwen2_5_vl"}
# Held-out score (accuracy, or mean IoU for grounding) that counts as "learned".
TASKS = {"mini_count": 0.7, "mini_ground": 0.3, "mini_classes": 0.4}
ARMS = {
    "gpg": {"name": "gpg"},
    "grpo": {"name": "grpo"},
    "dr_grpo": {"name": "dr_grpo"},
    "gpg F_norm=std": {"name": "gpg", "advantage_norm": "std"},
    "gpg alpha off": {"name": "gpg", "alpha_correction": False},
    "gpg beta_th=0": {"name": "gpg", "beta_th": 0.0},
    "gpg beta_th=0.6": {"name": "gpg", "beta_th": 0.6},
}
MAIN_ARMS = ("gpg", "grpo", "dr_grpo")
ABLATION_MODEL = "qwen2_vl"
RUN_SETTINGS = "settings.json"
SETTINGS = {  # generated completions per run, held-out rows, evaluation interval in completions
    "full": dict(samples=20000, eval_size=128, eval_every=1280, seeds=3),
    "quick": dict(samples=20000, eval_size=128, eval_every=1280, seeds=1),
}


@dataclass(frozen=True)
class Run:
    model: str
    task: str
    arm: str
    seed: int

    def folder(self, out: Path) -> Path:
        return out / "runs" / self.model / self.task / self.arm.replace(" ", "_") / f"seed{self.seed}"


def plan(models: list[str], tasks: list[str], arms: list[str], seeds: int) -> list[Run]:
    """Main arms on every model; ablation arms on the ablation model only."""
    return [Run(m, t, a, s) for m in models for t in tasks for a in arms for s in range(seeds)
            if a in MAIN_ARMS or m == ABLATION_MODEL]


def overrides(run: Run, folder: Path, setting: dict) -> list[str]:
    algo = [f"algorithm.{k}={json.dumps(v)}" for k, v in ARMS[run.arm].items()]
    return [f"model.path={MODELS[run.model]}", f"task.name={run.task}", *algo,
            f"train.seed={run.seed}", f"train.output_dir={folder}", f"train.max_samples={setting['samples']}",
            f"task.eval_size={setting['eval_size']}", "train.eval_every=0",
            f"train.eval_every_samples={setting['eval_every']}",
            "train.plot=false", "train.tensorboard=false", "train.log_every=1000000"]


def run_settings(run: Run, setting: dict) -> dict:
    """What a run's results depend on besides its name: a finished run is reused only when these match."""
    return {"model": MODELS[run.model], "algorithm": ARMS[run.arm], "preset": PRESET.read_text(),
            **{k: setting[k] for k in ("samples", "eval_size", "eval_every")}}


def finished(run: Run, out: Path, setting: dict) -> bool:
    folder = run.folder(out)
    if not (folder / "raw.jsonl").is_file() or not (folder / RUN_SETTINGS).is_file():
        return False
    return json.loads((folder / RUN_SETTINGS).read_text()) == run_settings(run, setting)


def train_one(run: Run, out: Path, setting: dict) -> None:
    """Train one run in this process (its console output to log.txt) and write its raw records."""
    from gpg_vl.config import load_config
    from gpg_vl.metrics import read_metrics
    from gpg_vl.trainer import train

    folder = run.folder(out)
    if folder.exists():  # an interrupted earlier attempt
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / RUN_SETTINGS).write_text(json.dumps(run_settings(run, setting), indent=1))
    start = time.perf_counter()
    with open(folder / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        train(load_config(PRESET, overrides(run, folder, setting)))
    wall = time.perf_counter() - start
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the curves are what is compared
    records = raw_records(run, read_metrics(folder / "metrics.jsonl"), wall)
    (folder / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def raw_records(run: Run, metrics: list[dict], wall: float) -> list[dict]:
    """One record per step (step 0 included): training metrics and, where it was measured,
    the held-out score (the task's own metric: eval/accuracy, eval/mIoU for mini_ground);
    `wall` is the whole run's wall time."""
    from gpg_vl.task import get_task_class

    task = get_task_class(run.task)
    heldout, trained = f"eval/{task.metric_label}", f"reward/{task.metric_component}"
    steps: dict[int, dict] = {}
    for m in metrics:
        steps.setdefault(m["step"], {}).update(m)
    records = []
    for step in sorted(steps):
        m = steps[step]
        records.append({**asdict(run), "step": step, "samples": m.get("samples_generated", 0),
                        "heldout": m.get(heldout), "train_reward": m.get(trained),
                        "valid_fraction": m.get("valid_fraction"), "resample_rounds": m.get("resample_rounds"),
                        "step_time": m.get("step_time"), "run_wall_time": round(wall, 2)})
    return records


def worker_init(threads: int) -> None:
    """Set before torch and transformers are imported: one BLAS pool of `threads` per worker,
    nothing looked up online, transformers' one-time warnings kept off the shared console."""
    os.environ.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                      OMP_NUM_THREADS=str(threads))


def run_all(runs: list[Run], out: Path, setting: dict, jobs: int) -> list[dict]:
    """Train the runs that have no results of these settings yet, `jobs` at a time; all runs' records."""
    from tqdm.auto import tqdm

    done = {run: run.folder(out) / "raw.jsonl" for run in runs}
    todo = [run for run in runs if not finished(run, out, setting)]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    print(f"{len(runs)} runs of {setting['samples']} generated completions each, {len(todo)} to train, "
          f"{jobs} at a time, in {out}")
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), unit="run", dynamic_ncols=True)
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=worker_init,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(train_one, run, out, setting): run for run in todo}
        for future in as_completed(futures):
            run = futures[future]
            if future.exception() is not None:
                raise RuntimeError(f"run {run} failed; its log: {run.folder(out) / 'log.txt'}") from future.exception()
            bar.set_postfix_str(f"{run.model} {run.task} {run.arm} seed {run.seed}")
            bar.update(1)
    bar.close()
    records = []
    for path in done.values():
        records += [json.loads(line) for line in path.read_text().splitlines()]
    with open(out / "raw.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


# ---- summaries ------------------------------------------------------------------------

def by_run(records: list[dict]) -> dict[tuple, list[dict]]:
    runs: dict[tuple, list[dict]] = {}
    for r in records:
        runs.setdefault((r["model"], r["task"], r["arm"], r["seed"]), []).append(r)
    return runs


def heldout_curve(records: list[dict]) -> list[tuple[int, float]]:
    """(samples generated, held-out score) at each evaluation of one run."""
    return [(r["samples"], r["heldout"]) for r in records if r["heldout"] is not None]


def samples_to_reach(curve: list[tuple[int, float]], threshold: float) -> int | None:
    return next((s for s, v in curve if v >= threshold), None)


def score_at(curve: list[tuple[int, float]], samples: float) -> float:
    """The held-out score of the last evaluation at or before `samples`."""
    return [v for s, v in curve if s <= samples][-1]


def mean_std(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} +- {spread:.{digits}f}"


def seed_groups(records: list[dict]) -> dict[tuple, list[list[dict]]]:
    """(model, task, arm) -> each seed's records, in the order the records came."""
    groups: dict[tuple, list[list[dict]]] = {}
    for (model, task, arm, _), recs in by_run(records).items():
        groups.setdefault((model, task, arm), []).append(recs)
    return groups


def summary(records: list[dict]) -> str:
    """Final held-out score, arms down and task (model) across, as the paper lays out its tables."""
    groups = seed_groups(records)
    columns = list(dict.fromkeys((task, model) for model, task, _ in groups))
    arms = list(dict.fromkeys(arm for _, _, arm in groups))
    lines = ["| arm | " + " | ".join(f"{task} ({model})" for task, model in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for arm in arms:
        cells = [mean_std([heldout_curve(r)[-1][1] for r in groups[(model, task, arm)]], 2)
                 if (model, task, arm) in groups else "" for task, model in columns]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table(records: list[dict], setting: dict) -> str:
    groups = seed_groups(records)
    lines = [f"Budget: {setting['samples']} generated completions per run; held-out set of "
             f"{setting['eval_size']} rows, greedy. Mean +- std over seeds.", "",
             "Final held-out score (accuracy; mean IoU for mini_ground):", "", summary(records),
             "| model | task | arm | seeds | final held-out | samples to threshold (reached) "
             "| training reward, last tenth | valid fraction | resample rounds | wall time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, task, arm), seeds in groups.items():
        curves = [heldout_curve(r) for r in seeds]
        reached = [samples_to_reach(c, TASKS[task]) for c in curves]
        hits = [s for s in reached if s is not None]
        steps = [r for recs in seeds for r in recs if r["valid_fraction"] is not None]
        late = [r["train_reward"] for r in steps if r["samples"] > 0.9 * setting["samples"]]
        lines.append(" | ".join([
            f"| {model}", task, arm, str(len(seeds)), mean_std([c[-1][1] for c in curves]),
            f"{mean_std(hits, 0) if hits else '-'} ({len(hits)}/{len(seeds)} reach {TASKS[task]})",
            f"{statistics.fmean(late):.3f}" if late else "-",
            f"{statistics.fmean(r['valid_fraction'] for r in steps):.2f}",
            f"{statistics.fmean(r['resample_rounds'] for r in steps):.2f}",
            mean_std([recs[-1]["run_wall_time"] for recs in seeds], 0)]) + " |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], models: list[str], tasks: list[str], arms: list[str], path: Path):
    """One panel per task and model (and a row of ablations on the ablation model): held-out
    score against generated completions, mean over seeds with the min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = by_run(records)
    rows = [(m, [a for a in arms if a in MAIN_ARMS], "") for m in models]
    ablation = [a for a in arms if a not in MAIN_ARMS]
    if ablation and ABLATION_MODEL in models:
        rows.append((ABLATION_MODEL, ["gpg", *ablation] if "gpg" in arms else ablation, ", ablations"))
    rows = [row for row in rows if row[1]]
    fig, axes = plt.subplots(len(rows), len(tasks), figsize=(4.2 * len(tasks), 3.2 * len(rows)), squeeze=False)
    for (model, row_arms, note), axrow in zip(rows, axes):
        for task, ax in zip(tasks, axrow):
            for arm in row_arms:
                curves = [heldout_curve(recs) for (m, t, a, _), recs in runs.items() if (m, t, a) == (model, task, arm)]
                if not curves:
                    continue
                # Up to the last evaluation: a run may pass the budget by part of its last step.
                end = max(c[-1][0] for c in curves)
                grid = [end * i / 80 for i in range(81)]
                ys = [[score_at(c, x) for c in curves] for x in grid]
                ax.plot(grid, [statistics.fmean(y) for y in ys], drawstyle="steps-post", label=f"{arm} ({len(curves)})")
                ax.fill_between(grid, [min(y) for y in ys], [max(y) for y in ys], step="post", alpha=0.15)
            ax.set_title(f"{task} · {model}{note}", fontsize=10)
            ax.set_xlabel("generated completions")
            ax.set_ylabel("held-out IoU" if task == "mini_ground" else "held-out accuracy")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, title="arm (seeds)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, the tiny Qwen2-VL, the main arms only")
    p.add_argument("--out", type=Path, help="output folder (default runs/compare or runs/compare_quick)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), help="default: both (quick: qwen2_vl)")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--arms", nargs="+", choices=list(ARMS), metavar="ARM",
                   help=f"default: all of {', '.join(repr(a) for a in ARMS)} (quick: {', '.join(MAIN_ARMS)})")
    p.add_argument("--seeds", type=int, help="seeds per arm (default 3, quick 1)")
    p.add_argument("--samples", type=int, help="generated completions per run (default 20000)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs trained at once")
    args = p.parse_args(argv)
    setting = dict(SETTINGS["quick" if args.quick else "full"])
    setting["seeds"] = args.seeds or setting["seeds"]
    setting["samples"] = args.samples or setting["samples"]
    if setting["seeds"] < 1 or setting["samples"] < 1 or args.jobs < 1:
        p.error("--seeds, --samples and --jobs must be at least 1")
    models = args.models or (["qwen2_vl"] if args.quick else list(MODELS))
    arms = args.arms or (list(MAIN_ARMS) if args.quick else list(ARMS))
    out = args.out or ROOT / "runs" / ("compare_quick" if args.quick else "compare")
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(models, args.tasks, arms, setting["seeds"])
    if not runs:
        p.error(f"nothing to run: the ablation arms run on {ABLATION_MODEL} only")
    start = time.perf_counter()
    records = run_all(runs, out, setting, args.jobs)
    (out / "table.md").write_text(table(records, setting))
    plot(records, models, args.tasks, arms, out / "curves.png")
    print((out / "table.md").read_text())
    print(f"wrote {out / 'table.md'}, {out / 'curves.png'} and {out / 'raw.jsonl'} "
          f"in {math.ceil(time.perf_counter() - start)} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
