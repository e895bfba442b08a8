"""scripts/compare.py: its plan and summaries, and its quick setting end to end."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpg_vl.boxes import PixelBoxes
from gpg_vl.task import ScoreContext, TaskConfig, build_task

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("compare", ROOT / "scripts" / "compare.py")
compare = importlib.util.module_from_spec(spec)
sys.modules["compare"] = compare  # dataclasses look their module up there
spec.loader.exec_module(compare)


def test_plan_runs_ablations_on_the_ablation_model_only():
    runs = compare.plan(["qwen2_vl", "qwen2_5_vl"], ["mini_count"], ["gpg", "gpg alpha off"], 3)
    assert len(runs) == 3 * 2 + 3  # gpg on both models, the ablation on one
    assert {r.model for r in runs if r.arm == "gpg alpha off"} == {compare.ABLATION_MODEL}
    assert sorted({r.seed for r in runs}) == [0, 1, 2]


def test_every_arm_sets_only_real_algorithm_options():
    from gpg_vl.config import load_config

    for arm in compare.ARMS:
        run = compare.Run("qwen2_vl", "mini_ground", arm, 1)
        cfg = load_config(compare.PRESET, compare.overrides(run, Path("/tmp/x"), compare.SETTINGS["full"]))
        assert cfg.algorithm.name == compare.ARMS[arm]["name"] and cfg.train.seed == 1
        assert cfg.train.max_samples == compare.SETTINGS["full"]["samples"]
    ablations = {a: compare.ARMS[a] for a in compare.ARMS if a not in compare.MAIN_ARMS}
    assert ablations == {"gpg F_norm=std": {"name": "gpg", "advantage_norm": "std"},
                         "gpg alpha off": {"name": "gpg", "alpha_correction": False},
                         "gpg beta_th=0": {"name": "gpg", "beta_th": 0.0},
                         "gpg beta_th=0.6": {"name": "gpg", "beta_th": 0.6}}


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path):
    run = compare.Run("qwen2_vl", "mini_count", "gpg", 0)
    setting = compare.SETTINGS["quick"]
    folder = run.folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / "raw.jsonl").write_text("{}\n")
    assert not compare.finished(run, tmp_path, setting)  # no settings: an interrupted or older run
    (folder / compare.RUN_SETTINGS).write_text(json.dumps(compare.run_settings(run, setting)))
    assert compare.finished(run, tmp_path, setting)
    assert not compare.finished(run, tmp_path, {**setting, "samples": 5000})
    assert not compare.finished(compare.Run("qwen2_vl", "mini_count", "grpo", 0), tmp_path, setting)


def test_curve_helpers():
    curve = [(0, 0.0), (640, 0.25), (1280, 0.7), (1920, 0.9)]
    assert compare.samples_to_reach(curve, 0.7) == 1280
    assert compare.samples_to_reach(curve, 0.95) is None
    assert compare.score_at(curve, 1000) == 0.25 and compare.score_at(curve, 1920) == 0.9
    assert compare.mean_std([0.5, 0.7, 0.9]) == "0.700 +- 0.200"
    assert compare.mean_std([3.0]) == "3.000 +- 0.000" and compare.mean_std([]) == "-"


def test_table_reports_mean_spread_and_threshold_counts():
    def records(seed, scores):
        return [{"model": "qwen2_vl", "task": "mini_count", "arm": "gpg", "seed": seed, "step": i,
                 "samples": 100 * i, "heldout": s, "valid_fraction": None if i == 0 else 0.5,
                 "train_reward": None if i == 0 else 0.1 * i,
                 "resample_rounds": None if i == 0 else 2, "run_wall_time": 10.0 + seed}
                for i, s in enumerate(scores)]

    text = compare.table(records(0, [0.0, 0.8, 0.9]) + records(1, [0.0, 0.2, 0.5]), {"samples": 200, "eval_size": 8})
    row = [line for line in text.splitlines() if line.startswith("| qwen2_vl")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    # training reward over the last tenth of the budget: the step-2 records of both seeds
    assert cells[3:] == ["2", "0.700 +- 0.283", "100 +- 0 (1/2 reach 0.7)", "0.200", "0.50", "2.00", "10 +- 1"]
    assert "| gpg | 0.70 +- 0.28 |" in text  # the summary: arms down, task (model) across


@pytest.mark.slow
def test_quick_comparison_writes_its_outputs_and_gpg_learns(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "scripts/compare.py", "--quick", "--tasks", "mini_count", "--arms", "gpg",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("table.md", "curves.png", "raw.jsonl"):
        assert (tmp_path / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (tmp_path / "raw.jsonl").read_text().splitlines()]
    scores = [r["heldout"] for r in records if r["heldout"] is not None]
    assert records[-1]["samples"] >= compare.SETTINGS["quick"]["samples"]
    # The untrained model cannot even answer with a digit; GPG's model counts better than
    # any constant answer does on the same held-out rows.
    task = build_task(TaskConfig(name="mini_count"))
    rows = task.rows("test")[:compare.SETTINGS["quick"]["eval_size"]]
    best_constant = max(sum(task.score(d, r, ScoreContext(PixelBoxes()))["accuracy"] for r in rows) / len(rows) for d in task.answers)
    assert scores[0] == 0.0 and scores[-1] > best_constant + 0.05, (scores, best_constant)
    rerun = subprocess.run([sys.executable, "scripts/compare.py", "--quick", "--tasks", "mini_count", "--arms", "gpg",
                            "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "0 to train" in rerun.stdout, rerun.stdout[-2000:]
