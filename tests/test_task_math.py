"""The text-only math tasks (math, math_rs) and their reward pieces: last_boxed, symbolic_equal."""

import json
import math
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpg_vl.boxes import PixelBoxes
from gpg_vl.datafiles import BadRowError
from gpg_vl.rewards import last_boxed, symbolic_equal
from gpg_vl.task import ScoreContext, TaskConfig, build_task, task_names

ROOT = Path(__file__).resolve().parent.parent
CTX = ScoreContext(PixelBoxes())
HUGE = "x" * 100_000


def make(name, **kw):
    return build_task(TaskConfig(name=name, **kw))


# ---------------------------------------------------------------- last_boxed


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{7}.", "7"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{ 3 } and later \\boxed{4}", "4"),  # the last box
    ("\\boxed{4} then \\boxed{5", None),  # the last box is truncated: no answer, not the earlier one
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not counted
    ("\\boxed{a\\\\}", "a\\\\"),  # a LaTeX line break before the closing brace
    ("$\\boxed 5$", "5"), ("\\fbox{6}", "6"), ("\\boxed{}", ""),
    ("\\boxed{\\boxed{8}}", "8"), ("no box", None), ("", None), ("\\boxed", None), ("\\boxedx{1}", None),
    ("答案是 \\boxed{七}", "七"),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_last_boxed_is_fast_on_huge_text():
    start = time.monotonic()
    assert last_boxed("\\boxed{" + HUGE * 10) is None
    assert last_boxed(HUGE * 10 + "\\boxed{1}") == "1"
    assert last_boxed("\\boxed{" + "{" * 100_000) is None
    assert time.monotonic() - start < 1


# ---------------------------------------------------------------- symbolic_equal


@pytest.mark.parametrize("pred,gold,expected", [
    ("\\frac{\\sqrt2}{2}", "\\sqrt{2}/2", True), ("x+1", "1+x", True), ("\\frac12", "0.5", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True), ("\\{1,2\\}", "\\{2,1\\}", True), ("x = 3", "3", True),
    ("3", "4", False), ("\\frac{1}{3}", "0.33", False), ("x+2", "x+1", False),
    ("", "3", False), ("3", "", False), ("   ", "3", False), ("}{", "3", False),
    ("3 or 4", "3", False), ("七", "7", False),
    ("1" * 1001, "1" * 1001, False),  # over SYMBOLIC_MAX_CHARS: not parsed at all
])
def test_symbolic_equal(pred, gold, expected):
    assert symbolic_equal(pred, gold) is expected


@pytest.mark.parametrize("bomb", ["9^{9^{9^{9}}}", "10^{10^{10}}"])
def test_symbolic_equal_stops_a_runaway_check(bomb):
    # Each would run sympy for minutes: the worker is killed at the limit and the answer is wrong.
    start = time.monotonic()
    assert symbolic_equal(bomb, "3", timeout_s=0.5) is False
    assert time.monotonic() - start < 0.5 + 3  # the limit, plus waiting for the previous worker's start
    assert symbolic_equal("\\frac{6}{8}", "\\frac34")  # a fresh worker answers the next check


# ---------------------------------------------------------------- math (SimpleRL-Zoo layout)

SIMPLE = {"prompt": "p", "answer": "\\frac{3}{4}"}


def test_registered_and_options():
    assert {"math", "math_rs"} <= set(task_names())
    for name in ("math", "math_rs"):
        with pytest.raises(ValueError, match="unknown option 'symbolic_timeout_s'"):  # it is task.reward_timeout_s
            make(name, options={"symbolic_timeout_s": 1})


def test_math_sample_and_prompt():
    task = make("math")
    train, test = task.rows("train"), task.rows("test")
    assert len(train) == len(test) == 10
    raw = pq.read_table(ROOT / "assets/samples/math/train.parquet").to_pylist()
    assert task.prompt(train[0]) == raw[0]["input"]  # SimpleRL-Zoo's prompt, sent as is
    assert raw[0]["input"].endswith("within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    assert [r["answer"] for r in train] == [r["gt_answer"] for r in raw]
    assert task.images(train[0]) == []


@pytest.mark.parametrize("completion,accuracy", [
    ("6/8 = 3/4, so the answer is \\boxed{\\frac{3}{4}}.", 1), ("\\boxed{0.75}", 1), ("\\boxed{\\dfrac34}", 1),
    ("\\boxed{\\frac{4}{3}}", 0), ("\\boxed{3/4} wait, \\boxed{1}", 0), ("\\boxed{1} no: \\boxed{3/4}", 1),
    ("the answer is 3/4", 0),  # no box: the reward asks for one
    ("\\boxed{}", 0), ("\\boxed{3/4", 0), ("", 0), ("答案 \\boxed{3/4}", 1),
    ("\\boxed{3/4 or 4/3}", 0), (HUGE + "\\boxed{3/4}", 1), ("\\boxed{" + HUGE + "}", 0),
])
def test_math_golden(completion, accuracy):
    assert make("math").score(completion, SIMPLE, CTX) == {"accuracy": accuracy}


def write(path: Path, records) -> str:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_math_accepts_each_field_layout(tmp_path):
    chat = [{"role": "user", "content": "What is 1+1?"}]
    records = [
        {"input": "raw prompt", "gt_answer": "2"},
        {"prompt": chat, "target": "2"},  # verl stores chat messages
        {"prompt": "raw", "answer": "The sum is $\\boxed{2}$."},  # a worked solution
        {"question": "What is 1+1?", "ground_truth_answer": "2"},
        {"problem": "What is 1+1?", "solution": "\\boxed{2}"},
        {"prompt": chat, "reward_model": {"style": "rule", "ground_truth": "2"}},  # verl
    ]
    rows = make("math", data_path=write(tmp_path / "train.jsonl", records)).rows("train")
    assert [r["answer"] for r in rows] == ["2"] * 6
    assert rows[0]["prompt"] == "raw prompt" and rows[1]["prompt"] == chat and rows[2]["prompt"] == "raw"
    assert rows[3]["prompt"] == [{"role": "user", "content": "What is 1+1?\nPlease reason step by step, "
                                  "and put your final answer within \\boxed{}."}]


@pytest.mark.parametrize("record,reason", [
    ({"input": "p"}, "no answer field"),
    ({"gt_answer": "2"}, "no prompt field"),
    ({"input": "", "gt_answer": "2"}, "'input' is empty"),
    ({"input": "p", "gt_answer": "  "}, "'gt_answer' is empty"),
    ({"input": "p", "answer": "\\boxed{ }"}, "empty \\\\boxed"),
    ({"prompt": [{"role": "user"}], "gt_answer": "2"}, "list of {role, content} messages"),
    ({"input": 3, "gt_answer": "2"}, "not text"),
])
def test_math_bad_rows(tmp_path, record, reason):
    good = {"input": "p", "gt_answer": "1"}
    path = write(tmp_path / "train.jsonl", [good, record])
    with pytest.raises(BadRowError, match=rf"train\.(parquet|jsonl), row 1: .*{reason}"):
        make("math", data_path=path).rows("train")
    with pytest.warns(UserWarning, match="kept 1 of 2 rows, skipped 1"):
        assert len(make("math", data_path=path, on_bad_row="skip").rows("train")) == 1


def test_math_parquet_null_is_a_missing_field(tmp_path):
    # A parquet file has every column in every row; a row without a value holds null.
    schema = pa.schema([("input", pa.string()), ("gt_answer", pa.string())])
    table = pa.Table.from_pylist([{"input": "p", "gt_answer": "1"}, {"input": "p", "gt_answer": None}], schema)
    pq.write_table(table, tmp_path / "train.parquet")
    with pytest.raises(BadRowError, match=r"train\.parquet, row 1: no answer field"):
        make("math", data_path=str(tmp_path)).rows("train")


def test_math_empty_split_and_missing_file(tmp_path):
    write(tmp_path / "train.jsonl", [])
    with pytest.raises(BadRowError, match="no usable rows"):
        make("math", data_path=str(tmp_path)).rows("train")
    with pytest.raises(FileNotFoundError, match="no test.json"):
        make("math", data_path=str(tmp_path)).rows("test")


# ---------------------------------------------------------------- math_rs (open-rs)

RS = {"prompt": "p", "answer": "7"}


def test_math_rs_sample_and_prompt():
    task = make("math_rs")
    train = task.rows("train")
    assert len(train) == len(task.rows("test")) == 10
    raw = json.loads((ROOT / "assets/samples/math_rs/train.jsonl").read_text().splitlines()[0])
    system, user = task.prompt(train[0])
    assert system["role"] == "system" and system["content"].startswith("A conversation between User and Assistant.")
    assert user == {"role": "user", "content": raw["problem"]}
    assert train[0]["answer"] == last_boxed(raw["solution"])


# cosine reward, L = length in characters, c = cos(pi * min(L, 1000) / 1000):
#   correct: 0.5 + 0.5 * (1 + c) / 2  -> L=0: 1.0, L=500: 0.75, L=1000: 0.5, L=2000: 0.5 (clamped)
#   wrong:   0.0 - 0.5 * (1 + c) / 2  -> L=0: -0.5, L=500: -0.25, L=1000: 0.0, L=2000: 0.0
@pytest.mark.parametrize("correct,length,expected", [
    (True, 0, 1.0), (True, 500, 0.75), (True, 250, 0.5 + 0.25 * (1 + math.cos(math.pi / 4))),
    (True, 1000, 0.5), (True, 2000, 0.5), (True, 10**9, 0.5),
    (False, 0, -0.5), (False, 500, -0.25), (False, 1000, 0.0), (False, 2000, 0.0),
])
def test_cosine_scaled(correct, length, expected):
    module = sys.modules[type(make("math_rs")).__module__]
    assert module.cosine_scaled(correct, length) == pytest.approx(expected, abs=1e-12)


def rs_case(body, pad_to=None):
    text = f"Let me add.\n</think>\n{body}"
    return text if pad_to is None else text + " " * (pad_to - len(text))


@pytest.mark.parametrize("completion,accuracy,fmt,cosine", [
    (rs_case("\\boxed{7}", 500), 1, 1, 0.75), (rs_case("\\boxed{7}", 1000), 1, 1, 0.5),
    (rs_case("\\boxed{7}", 4000), 1, 1, 0.5),  # clamped: the reference's cosine would rise again here
    (rs_case("\\boxed{8}", 500), 0, 1, -0.25), (rs_case("no box", 1000), 0, 1, 0.0),
    ("\\boxed{7}" + " " * 491, 1, 0, 0.75),  # right, but the thinking never closed
    (rs_case("\n</think>\n\\boxed{7}", 500), 1, 0, 0.75),  # "\n</think>\n" twice
    ("", 0, 0, -0.5), ("\\boxed{7}" + HUGE, 1, 0, 0.5), (rs_case("\\boxed{七}", 500), 0, 1, -0.25),
])
def test_math_rs_golden(completion, accuracy, fmt, cosine):
    task = make("math_rs")
    got = task.score(completion, RS, CTX)
    assert got == pytest.approx({"accuracy": accuracy, "format": fmt, "cosine": cosine}, abs=1e-12)
    # The training reward is format + 2 x cosine; accuracy is logged, not added a second time.
    assert task.total_reward(got) == pytest.approx(fmt + 2 * cosine, abs=1e-12)


def test_math_rs_bad_rows(tmp_path):
    records = [{"problem": "p", "solution": "\\boxed{1}"}, {"problem": "p"}, {"solution": "1"},
               {"problem": "p", "solution": ""}]
    path = write(tmp_path / "train.jsonl", records)
    with pytest.raises(BadRowError, match=r"train\.jsonl, row 1: .*no answer field; expected one of solution"):
        make("math_rs", data_path=path).rows("train")
    with pytest.warns(UserWarning, match="skipped 3"):
        assert len(make("math_rs", data_path=path, on_bad_row="skip").rows("train")) == 1


# ---------------------------------------------------------------- the tiny presets train end to end


@pytest.mark.parametrize("preset", ["math_7b_tiny", "math_1p5b_tiny"])
def test_tiny_preset_trains(tmp_path, preset, train_preset):
    assert train_preset(preset, tmp_path / "run")
