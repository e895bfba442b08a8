"""Rows with several images: placeholders filled in order, each image resized within the pixel
limits on its own, through every vision family's encoding, the loss forward, training and the
evaluation harness (tests/plugins/pair_task.py: which of two images is brighter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from gpg_vl.boxes import smart_resize
from gpg_vl.config import load_config
from gpg_vl.evaluate import evaluate
from gpg_vl.models import load_adapter
from gpg_vl.models.base import collate
from gpg_vl.resources import TINY_MODELS
from gpg_vl.task import TaskConfig, build_task
from gpg_vl.trainer import train

ROOT = Path(__file__).resolve().parent.parent
TINY = TINY_MODELS
PAIR = str(ROOT / "tests" / "plugins" / "pair_task.py")
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
MIN_PIXELS, MAX_PIXELS = 3136, 12544


@pytest.fixture(scope="module")
def adapters():
    return {f: load_adapter(str(TINY / f), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) for f in FAMILIES}


def runs(ids: torch.Tensor, token: int) -> list[int]:
    """Lengths of the runs of `token` in ids, in order."""
    found, length = [], 0
    for t in ids.tolist() + [None]:
        if t == token:
            length += 1
        elif length:
            found, length = found + [length], 0
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_each_image_fills_its_own_placeholder_in_order_at_its_own_size(adapters, family):
    adapter = adapters[family]
    ip = adapter.processor.image_processor
    factor = ip.patch_size * ip.merge_size
    task = build_task(TaskConfig(name=PAIR))
    row = task.rows("train")[0]
    images = [Image.new("RGB", (300, 41)), Image.new("RGB", (20, 20)), Image.new("RGB", (120, 200))]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}] * 3}]
    for p, ims in ((task.prompt(row), task.images(row)), (prompt, images)):
        enc = adapter.encode(p, ims)
        expected = [smart_resize(im.height, im.width, factor, MIN_PIXELS, MAX_PIXELS) for im in ims]  # (w, h)
        assert enc.image_grid_thw.tolist() == [[1, h // ip.patch_size, w // ip.patch_size] for w, h in expected]
        assert runs(enc.input_ids, adapter.image_token_id) == [(w // factor) * (h // factor) for w, h in expected]
        assert enc.pixel_values.shape[0] == int(enc.image_grid_thw.prod(-1).sum())
        assert adapter.count_prompt_tokens(p, [im.size for im in ims]) == enc.num_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_the_order_of_the_images_is_what_the_model_reads(adapters, family):
    adapter = adapters[family]
    prompt = build_task(TaskConfig(name=PAIR)).prompt({})
    black, white = Image.new("RGB", (56, 56), "black"), Image.new("RGB", (56, 56), "white")

    def last_logits(images):
        batch = collate([adapter.encode(prompt, images)], adapter.pad_token_id)
        with torch.no_grad():
            return adapter.model(**batch.model_inputs()).logits[0, -1]

    assert (last_logits([black, white]) - last_logits([white, black])).abs().max() > 1e-4
    assert torch.equal(last_logits([black, white]), last_logits([black, white]))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_placeholder_count_that_differs_from_the_images_is_named(adapters, family):
    prompt = build_task(TaskConfig(name=PAIR)).prompt({})
    with pytest.raises(ValueError, match=r"the prompt places 2 image\(s\) but the row has 1"):
        adapters[family].encode(prompt, [Image.new("RGB", (56, 56))])


@pytest.mark.parametrize("family", FAMILIES)
def test_two_image_rows_train_and_evaluate(tmp_path, family):
    cfg = load_config(None, [f"model.path={TINY / family}", f"model.max_pixels={MAX_PIXELS}", f"task.name={PAIR}",
                             "task.eval_split=test", "task.eval_size=4", "algorithm.group_size=4",
                             "rollout.max_new_tokens=2", "train.prompts_per_device=2", "train.grad_accum=1",
                             "train.learning_rate=1e-3", "train.max_steps=2", "algorithm.max_resample_rounds=2",
                             f"train.output_dir={tmp_path / 'run'}", "train.tensorboard=false", "train.plot=false"])
    train(cfg)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2]
    summary = evaluate(load_config(None, ["task.reward_workers=0"], {
        "eval.task": PAIR, "eval.model": str(tmp_path / "run" / "checkpoints" / "step_000002"),
        "eval.output_dir": str(tmp_path / "eval"), "eval.max_new_tokens": 2, "eval.limit": 6, "eval.batch_size": 4}))
    records = [json.loads(line) for line in (tmp_path / "eval" / "items.jsonl").read_text().splitlines()]
    assert summary["parts"][0]["items"] == 6 and [r["index"] for r in records] == list(range(6))
    # The prompt as the model read it: both placeholders, in the task's order.
    assert all(r["prompt"].count("<|image_pad|>") == 2 and r["prompt"].index("Image 1:") < r["prompt"].index("Image 2:")
               for r in records)
