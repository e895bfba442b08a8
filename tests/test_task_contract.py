"""The contract every registered task keeps, checked for each one: a task is covered the
moment it registers (built in, or through the gpg_vl.tasks entry point group).

Its bundled sample loads; every prompt encodes on a tiny model of each family that can read
it; `score` returns exactly the declared components, finite, quickly on 100k-character and
unicode completions; `answer` is JSON-serialisable; the task evaluates end to end through
`gpg-vl eval`'s function; and a tiny preset trains it (or evaluates it) for two steps.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpg_vl.catalog import preset_tasks
from gpg_vl.config import load_config
from gpg_vl.evaluate import evaluate
from gpg_vl.models import load_adapter
from gpg_vl.models.qwen_vl import QwenVLAdapter
from gpg_vl.resources import PRESETS, TINY_MODELS
from gpg_vl.rollout import encode_rows
from gpg_vl.task import ScoreContext, TaskConfig, build_task, get_task_class, task_names

ROOT = Path(__file__).resolve().parent.parent
TASKS = task_names()
LONG = 100_000
HOSTILE = [
    "",
    "<think>" + "a" * LONG + "</think> <answer>1</answer>",
    "<answer>" + "9" * LONG + "</answer>",
    "<answer>" + "(" * LONG + "</answer>",
    "<answer>" + "(1,2),(3,4) " * (LONG // 12) + "</answer>",
    "<think>" + "<answer>" * (LONG // 8) + "</think>",
    "\\boxed{" * (LONG // 7) + "1",
    "<think>思考 ñ\u0301 😀</think> <answer>（Ｂ）\u200b２\u00a0cm</answer>",
    "<think>\x00\ud800</think>\n<answer>\ufeff-½ \\frac{1}{2} 3e2 A.</answer>",
]
ENCODED = 64
"""Rows of a split encoded: a bundled sample whole; a generated split's first ones."""
SECONDS = 5.0
"""A completion scores well within this: a reward that is quadratic in its input takes minutes
on 100k characters, a linear one milliseconds (the bound is loose for a loaded machine)."""


def the_preset(name: str) -> str:
    """The preset on a bundled tiny model that trains the task, else one that evaluates it."""
    tiny = {}
    for preset, (trained, evaluated) in preset_tasks().items():
        if load_config(PRESETS / f"{preset}.yaml").model.path.startswith("tiny:"):
            tiny.setdefault(trained, preset)
            tiny.setdefault(evaluated, preset)
    assert name in tiny, f"{name}: no preset on a tiny model trains or evaluates it (add <task>_tiny.yaml)"
    return tiny[name]


def readers(task, rows, adapters) -> list:
    """The tiny models of the families that can read the rows: vision-language ones for rows
    with images, every one for text."""
    has_images = any(task.image_sizes(r) for r in rows)
    return [a for a in adapters.values() if isinstance(a, QwenVLAdapter) or not has_images]


@pytest.fixture(scope="module")
def adapters():
    return {family: load_adapter(str(TINY_MODELS / family), max_pixels=12544)
            for family in sorted(p.name for p in TINY_MODELS.iterdir())}


@pytest.fixture(scope="module")
def tasks():
    return {name: build_task(TaskConfig(name=name, reward_workers=0)) for name in TASKS}


@pytest.mark.parametrize("name", TASKS)
def test_the_sample_loads_and_every_prompt_encodes_on_each_family(name, tasks, adapters):
    task = tasks[name]
    for split in type(task).splits:
        rows = list(task.rows(split))
        assert rows, f"{name}: split {split} of the bundled sample is empty"
        assert len({str(r["id"]) for r in rows}) == len(rows), f"{name}: row ids repeat in {split}"
        shown = rows[:ENCODED]
        for adapter in readers(task, shown, adapters):
            encoded = encode_rows(adapter, task, shown)
            assert all(p.num_tokens > 0 for p in encoded)


@pytest.mark.parametrize("name", TASKS)
def test_score_and_answer_on_hostile_completions(name, tasks, adapters):
    task = tasks[name]
    components = set(task.reward_components)
    assert task.metric_component in components
    row = task.rows(type(task).splits[-1])[0]
    for adapter in readers(task, [row], adapters):  # each family's box convention
        ctx = ScoreContext(boxes=adapter.box_convention)
        for completion in HOSTILE:
            start = time.perf_counter()
            scores = task.score(completion, row, ctx)
            answer = task.answer(completion, row, ctx)
            took = time.perf_counter() - start
            assert set(scores) == components, f"{name}: {sorted(scores)} != {sorted(components)}"
            assert all(isinstance(v, float) and math.isfinite(v) for v in scores.values()), scores
            json.dumps(answer)
            assert took < SECONDS, f"{name}: {took:.1f} s on a {len(completion)}-character completion"


@pytest.mark.parametrize("name", TASKS)
def test_the_task_evaluates_end_to_end(name, tmp_path):
    cls = get_task_class(name)
    family = "qwen2" if name.startswith("math") else "qwen2_vl"
    cfg = load_config(None, ["model.max_pixels=12544", "task.reward_workers=0"], {
        "eval.task": name, "eval.model": str(TINY_MODELS / family), "eval.output_dir": str(tmp_path),
        "eval.max_new_tokens": 4, "eval.limit": 3, "eval.batch_size": 3, "eval.splits": [cls.splits[-1]]})
    summary = evaluate(cfg)
    part = summary["parts"][0]
    assert part["items"] == 3 and part["data"] == "bundled sample" and part["failed"] == 0
    assert part["headline"] == ("Total" if cls.metric_group else cls.metric_label)
    assert all(0.0 <= v <= 1.0 for v in summary["columns"].values())
    records = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert [set(r["scores"][0]) for r in records] == [set(cls.reward_components)] * 3


def test_every_tiny_preset_trains_two_steps(tmp_path):
    """Each task's tiny preset, two steps; four processes at a time, one thread each, so that
    they share the cores rather than fight over them."""
    presets = sorted({the_preset(name) for name in TASKS})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    failed, running = {}, []

    def finish(preset, proc):
        output, _ = proc.communicate(timeout=600)
        records = [json.loads(line) for line in (tmp_path / preset / "metrics.jsonl").read_text().splitlines()] \
            if proc.returncode == 0 else []
        evaluated = get_task_class(preset_tasks()[preset][1])
        held_out = f"eval/{'Total' if evaluated.metric_group else evaluated.metric_label}"  # under its own name
        if proc.returncode != 0 or not any(r.get("step") == 2 for r in records) or \
                not any(held_out in r for r in records):
            failed[preset] = output[-2000:] + f"\n(no {held_out} at step 2)"

    for preset in presets:
        cmd = [sys.executable, "-m", "gpg_vl.cli", "train", "--preset", preset, f"train.output_dir={tmp_path / preset}",
               "train.max_steps=2", "train.max_samples=0", "train.eval_every=2", "train.eval_every_samples=0",
               "task.eval_size=2", "train.tensorboard=false",
               "train.plot=false"]
        running.append((preset, subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                 text=True, env=env)))
        if len(running) == 4:
            finish(*running.pop(0))
    for preset, proc in running:
        finish(preset, proc)
    assert not failed, "\n\n".join(f"{k}:\n{v}" for k, v in failed.items())
