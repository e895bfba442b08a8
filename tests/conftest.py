"""Shared test helpers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpg_vl.resources import PRESETS

ROOT = Path(__file__).resolve().parent.parent


def run_preset(preset: str, out: Path) -> list[dict]:
    """Train the bundled preset <preset> in a subprocess; the metrics records it wrote."""
    cmd = [sys.executable, "-m", "gpg_vl.cli", "train", "--config", str(PRESETS / f"{preset}.yaml"),
           f"train.output_dir={out}", "train.tensorboard=false", "train.plot=false"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def train_preset():
    return run_preset
