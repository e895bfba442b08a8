"""The demo learns: the tiny random-init Qwen2-VL on `shapes` goes from chance to >= 0.8
greedy held-out accuracy within the preset's 300 GPG steps (fixed seed, CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpg_vl.resources import PRESETS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_tiny_qwen2_vl_learns_shapes_with_gpg(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "gpg_vl.cli", "train", "--config", str(PRESETS / "shapes.yaml"),
           f"train.output_dir={out}", "train.eval_every=0", "train.save_every=0", "train.tensorboard=false",
           "train.plot=false"]
    done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 300
    assert evals[0]["eval/accuracy"] <= 0.4  # chance: 4 colours, and the untrained model knows no colour word
    assert evals[-1]["eval/accuracy"] >= 0.8


@pytest.mark.slow
def test_the_vllm_engine_learns_as_the_hf_engine_does(tmp_path, vllm_tiny):
    """The same short GPG run (the demo's preset, the tiny Qwen2-VL with 32-wide heads) with each
    engine: held-out greedy accuracy and format rise alike. In 30 steps the model finds the
    colour words (format 0 -> 1) and names one colour for every image (accuracy 0 -> 0.27,
    as the demo does by step 100 with the bundled model)."""
    evals = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / engine
        cmd = [sys.executable, "-m", "gpg_vl.cli", "train", "--config", str(PRESETS / "shapes.yaml"),
               f"model.path={vllm_tiny / 'qwen2_vl'}", f"rollout.engine={engine}", "rollout.vllm_kv_cache_gb=0.0625",
               "train.max_steps=30", "task.eval_size=64", f"train.output_dir={out}", "train.eval_every=0",
               "train.save_every=0", "train.tensorboard=false", "train.plot=false"]
        done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=900,
                              env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"})
        assert done.returncode == 0, done.stderr[-3000:]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        evals[engine] = [r for r in records if "eval/accuracy" in r]
    for engine, points in evals.items():
        assert [p["step"] for p in points] == [0, 30], engine
        assert points[0]["eval/accuracy"] <= 0.05 and points[0]["eval/reward/format"] <= 0.05, engine
        assert points[-1]["eval/reward/format"] >= 0.9 and points[-1]["eval/accuracy"] >= 0.2, engine
