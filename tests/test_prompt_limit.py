"""rollout.max_prompt_tokens: a prompt over the limit is skipped and counted, never cut."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from gpg_vl.build import drop_long_prompts
from gpg_vl.models import load_adapter
from gpg_vl.task import Task, TaskConfig, image_chat
from gpg_vl.resources import TINY_MODELS

ROOT = Path(__file__).resolve().parent.parent



class Sized(Task):
    """Rows whose prompts differ in words and in image size."""

    def rows(self, split):
        return [{"words": w, "side": s} for w in (1, 8) for s in (56, 112, 224)]

    def prompt(self, row):
        return image_chat(" ".join(["shape"] * row["words"]))

    def images(self, row):
        return [Image.new("RGB", (row["side"], row["side"]))]

    def score(self, completion, row, ctx):
        return {"accuracy": 0.0}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_long_prompts_are_dropped_by_their_full_length(family):
    adapter = load_adapter(str(TINY_MODELS / family), max_pixels=50176)
    task = Sized(TaskConfig(name="sized"))
    rows = task.rows("train")
    lengths = [adapter.encode(task.prompt(r), task.images(r)).num_tokens for r in rows]
    assert len(set(lengths)) == len(rows)  # words and image tokens both count
    limit = sorted(lengths)[2]
    kept, dropped = drop_long_prompts(rows, task, adapter, limit)
    assert kept == [r for r, n in zip(rows, lengths) if n <= limit] and dropped == len(rows) - 3
    assert drop_long_prompts(rows, task, adapter, 0) == (rows, 0)  # 0 = no limit


def test_a_run_counts_what_it_skipped(tmp_path):
    """The coin task's prompts are "coin 5:" .. "coin 63:": one digit more is one token more."""
    adapter = load_adapter(str(TINY_MODELS / "qwen2"))
    short = adapter.encode("coin 5:", []).num_tokens
    assert adapter.encode("coin 55:", []).num_tokens > short
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gpg_vl.cli", "train", f"train.output_dir={out}", "train.tensorboard=false",
           "train.plot=false", "model.path=tiny:qwen2", f"task.name={ROOT / 'tests/plugins/coin_task.py'}",
           "task.eval_split=", "algorithm.group_size=2", "rollout.max_new_tokens=2", f"rollout.max_prompt_tokens={short}",
           "train.prompts_per_device=2", "train.grad_accum=1", "train.max_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # ids 0-9 fit; 10-63 are one token longer
    assert first["step"] == 0 and first["data/train_rows"] == 10 and first["data/prompts_over_limit"] == 54
    assert "skipped 54 training" in done.stdout + done.stderr
