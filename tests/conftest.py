"""Shared test helpers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_preset(preset: str, out: Path) -> list[dict]:
    """Train tasks/presets/<preset>.yaml in a subprocess; the metrics records it wrote."""
    cmd = [sys.executable, "-m", "gpg_vl.cli", "train", "--config", f"tasks/presets/{preset}.yaml",
           f"train.output_dir={out}", "train.tensorboard=false", "train.plot=false"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def train_preset():
    return run_preset


@pytest.fixture(scope="session")
def vllm_tiny(tmp_path_factory) -> Path:
    """The tiny models with 32-wide attention heads (gpg-vl build-tiny --head-dim 32): vLLM's
    CPU attention runs no narrower ones."""
    from gpg_vl.models.tiny import VLLM_HEAD_DIM, build_tiny_models

    out = tmp_path_factory.mktemp("tiny-vllm")
    build_tiny_models(out, head_dim=VLLM_HEAD_DIM)
    return out
