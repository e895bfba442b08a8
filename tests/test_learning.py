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
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 300
    assert evals[0]["eval/accuracy"] <= 0.4  # chance: 4 colours, and the untrained model knows no colour word
    assert evals[-1]["eval/accuracy"] >= 0.8
