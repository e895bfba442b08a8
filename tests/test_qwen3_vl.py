"""The tiny Qwen3-VL (dense and MoE) through every vision task: each task's tiny preset trains two
steps on it, and the trained checkpoint goes through the evaluation harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpg_vl.config import load_config
from gpg_vl.evaluate import evaluate
from gpg_vl.resources import PRESETS, TINY_MODELS
from gpg_vl.task import get_task_class
from gpg_vl.trainer import train

# preset -> the task it is evaluated on (sat trains on SAT and is evaluated on CV-Bench)
VISION_PRESETS = {"lisa_tiny": "lisa", "flower102_tiny": "flower102", "pets37_tiny": "pets37",
                  "fgvc_aircraft_tiny": "fgvc_aircraft", "cars196_tiny": "cars196", "geoqa_tiny": "geoqa",
                  "sat_tiny": "cvbench", "shapes": "shapes"}


def train_two_steps(preset: str, family: str, out: Path) -> list[dict]:
    cfg = load_config(PRESETS / f"{preset}.yaml",
                      [f"model.path={TINY_MODELS / family}", f"train.output_dir={out}", "train.max_steps=2",
                       "train.max_samples=0", "train.save_every=0", "train.eval_every=0",
                       "train.eval_every_samples=0", "task.eval_size=4", "train.tensorboard=false", "train.plot=false"])
    train(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset", VISION_PRESETS)
def test_each_tiny_preset_trains_and_evaluates_on_qwen3_vl(tmp_path, preset):
    records = train_two_steps(preset, "qwen3_vl", tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["reward_failures"] == 0 and r["samples_generated"] > 0 for r in steps)
    assert any(k.startswith("eval/") for r in records for k in r)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    assert json.loads((checkpoint / "hf" / "config.json").read_text())["model_type"] == "qwen3_vl"
    # the run's own settings (sat's name cvbench as the evaluated task), its checkpoint
    trained = load_config(tmp_path / "run" / "config.yaml", ["task.reward_workers=0"], {
        "eval.model": str(checkpoint), "eval.output_dir": str(tmp_path / "eval"), "eval.max_new_tokens": 4,
        "eval.limit": 4, "eval.batch_size": 4, "eval.splits": [get_task_class(VISION_PRESETS[preset]).splits[-1]]})
    summary = evaluate(trained)
    assert summary["parts"][0]["items"] == 4 and summary["parts"][0]["failed"] == 0


def test_the_moe_model_trains(tmp_path):
    steps = [r for r in train_two_steps("shapes", "qwen3_vl_moe", tmp_path) if "loss" in r]
    assert len(steps) == 2 and all(r["grad_norm"] > 0 for r in steps)
