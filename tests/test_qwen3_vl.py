"""The tiny Qwen3-VL (dense and MoE) through every vision task: each task's tiny preset trains two
steps on it, and the trained checkpoint goes through the evaluation harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpg_vl.config import load_config
from gpg_vl.evaluate import EvalSettings, evaluate
from gpg_vl.trainer import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "assets" / "tiny"
SAMPLES = ROOT / "assets" / "samples"
# preset -> (task evaluated, its options): sat trains on SAT and is evaluated on CV-Bench.
PRESETS = {
    "lisa_tiny": ("lisa", {}),
    "flower102_tiny": ("flower102", {}),
    "pets37_tiny": ("pets37", {}),
    "fgvc_aircraft_tiny": ("fgvc_aircraft", {}),
    "cars196_tiny": ("cars196", {}),
    "geoqa_tiny": ("geoqa", {}),
    "sat_tiny": ("cvbench", {}),
    "shapes": ("shapes", {"kinds": ["colour"], "max_shapes": 1, "format_weight": 0.5}),
}


def train_two_steps(preset: str, family: str, out: Path) -> list[dict]:
    cfg = load_config(ROOT / "tasks" / "presets" / f"{preset}.yaml",
                      [f"model.path={TINY / family}", f"train.output_dir={out}", "train.max_steps=2",
                       "train.save_every=0", "train.eval_every=0", "task.eval_size=4", "train.tensorboard=false",
                       "train.plot=false"])
    train(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset", PRESETS)
def test_each_tiny_preset_trains_and_evaluates_on_qwen3_vl(tmp_path, preset):
    records = train_two_steps(preset, "qwen3_vl", tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["reward_failures"] == 0 and r["samples_generated"] > 0 for r in steps)
    assert any("eval/accuracy" in r for r in records)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    assert json.loads((checkpoint / "hf" / "config.json").read_text())["model_type"] == "qwen3_vl"
    task, options = PRESETS[preset]
    summary = evaluate(EvalSettings(task=task, model=str(checkpoint), output_dir=str(tmp_path / "eval"),
                                    options=options, max_new_tokens=4, limit=4, batch_size=4))
    assert summary["parts"][0]["items"] == 4 and summary["parts"][0]["failed"] == 0
    assert summary["model"] == str(checkpoint)


def test_the_moe_model_trains(tmp_path):
    steps = [r for r in train_two_steps("shapes", "qwen3_vl_moe", tmp_path) if "loss" in r]
    assert len(steps) == 2 and all(r["grad_norm"] > 0 for r in steps)
