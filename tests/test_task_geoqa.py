"""The geoqa task: rows of both GeoQA layouts, bad rows, the prompt, golden completions, a tiny run."""

import io
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gpg_vl.boxes import PixelBoxes
from gpg_vl.datafiles import BadRowError
from gpg_vl.task import ScoreContext, TaskConfig, build_task, task_names

ROOT = Path(__file__).resolve().parent.parent
CTX = ScoreContext(PixelBoxes())
SUFFIX = "  Output the thinking process in <think> </think> and final answer (number) in <answer> </answer> tags."


def make(**kw):
    return build_task(TaskConfig(name="geoqa", **kw))


@pytest.fixture(scope="module")
def task():
    return make()


def png(size=(20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "white").save(buf, format="PNG")
    return buf.getvalue()


def test_registered_and_options():
    assert "geoqa" in task_names()
    # The time limit is task.reward_timeout_s, one setting for every task.
    with pytest.raises(ValueError, match="unknown option 'symbolic_timeout_s'. Known options: none"):
        make(options={"symbolic_timeout_s": 2})


def test_bundled_sample(task):
    train, test = task.rows("train"), task.rows("test")
    assert len(train) == len(test) == 10
    assert train[0]["answer"] == "60"  # "<answer>60</answer>" in the train layout
    assert all(r["answer"].endswith("°") for r in test)  # "95°" in the test layout
    for row in train + test:
        (image,) = task.images(row)
        assert image.mode == "RGB" and image.size == (96, 96)
    (message,) = task.prompt(test[0])
    assert message["role"] == "user" and message["content"][0] == {"type": "image"}
    assert message["content"][1]["text"] == test[0]["question"] + SUFFIX
    assert test[0]["question"].startswith("As shown in the figure")


ROW = {"question": "q", "answer": "140°", "image": None}
SURD = {"question": "q", "answer": "2√{3}", "image": None}


def wrap(answer, think="The angles of a line sum to 180."):
    return f"<think>{think}</think> <answer>{answer}</answer>"


@pytest.mark.parametrize("row,completion,accuracy,fmt", [
    (ROW, wrap("140"), 1, 1), (ROW, wrap("140°"), 1, 1), (ROW, wrap(" 140 "), 1, 1),
    (ROW, wrap("140 degrees"), 1, 1), (ROW, wrap("$140^\\circ$"), 1, 1), (ROW, wrap("140.0"), 1, 1),
    (ROW, wrap("１４０"), 1, 1),  # full-width digits are the same number after NFKC
    (ROW, wrap("40"), 0, 1), (ROW, wrap("1400"), 0, 1), (ROW, wrap("-140"), 0, 1),
    (ROW, "<answer>140</answer>", 1, 0),  # right answer, no thinking: accuracy without format
    (ROW, "The answer is 140.", 0, 0),  # no tags: nothing to score
    (ROW, "<think>x</think><answer>140", 0, 0),  # unclosed answer
    (ROW, wrap(""), 0, 1),  # an empty answer equals nothing
    (ROW, wrap("140 or 40"), 0, 1), (ROW, wrap("40 or 140"), 0, 1),  # hedging exploits
    (ROW, wrap("140, 40"), 0, 1), (ROW, wrap("140 40"), 0, 1),
    # Only the last answer counts, so a second block cannot hedge; the reference's format
    # expression (".*?" spans blocks) accepts the pair.
    (ROW, wrap("40") + wrap("140"), 1, 1), (ROW, wrap("140") + wrap("40"), 0, 1),
    (ROW, wrap("一百四十"), 0, 1), (ROW, wrap("140", think="思考" * 10), 1, 1),
    (SURD, wrap("2\\sqrt{3}"), 1, 1), (SURD, wrap("\\sqrt{12}"), 1, 1), (SURD, wrap("3\\sqrt{2}"), 0, 1),
])
def test_golden_completions(task, row, completion, accuracy, fmt):
    assert task.score(completion, row, CTX) == {"accuracy": accuracy, "format": fmt}


def test_huge_and_adversarial_completions_are_fast():
    task = make(reward_timeout_s=1.0)
    start = time.monotonic()
    assert task.score("x" * 100_000, ROW, CTX) == {"accuracy": 0, "format": 0}
    assert task.score(wrap("1" * 100_000), ROW, CTX) == {"accuracy": 0, "format": 1}
    assert task.score(wrap("{" * 100_000), ROW, CTX) == {"accuracy": 0, "format": 1}
    # sympy would spend minutes on 9^(9^(9^9)): the check is killed after 1 s and scores 0.
    assert task.score(wrap("9^{9^{9^{9}}}"), ROW, CTX) == {"accuracy": 0, "format": 1}
    assert time.monotonic() - start < 10
    assert task.score(wrap("140"), ROW, CTX)["accuracy"] == 1


def write_train(path: Path, records) -> None:
    pq.write_table(pa.Table.from_pylist(records), path)


def test_bad_rows(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.png").write_bytes(png())
    (tmp_path / "img" / "corrupt.png").write_bytes(b"not a png")
    good = {"image_path": "img/ok.png", "question": "q", "ground_truth": "30°"}
    bad = [
        {"image_path": "img/ok.png", "question": "q"},  # missing field
        {"image_path": "img/missing.png", "question": "q", "ground_truth": "30"},  # missing image
        {"image_path": "img/corrupt.png", "question": "q", "ground_truth": "30"},  # corrupt image
        {"image_path": "img/ok.png", "question": "q", "ground_truth": "  "},  # empty answer
        {"text": "neither layout"},
    ]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [good, *bad]))
    with pytest.raises(BadRowError, match=r"test\.jsonl, row 1: missing field 'ground_truth'"):
        make(data_path=str(tmp_path)).rows("test")
    for i, reason in [(2, "image not found"), (3, "unreadable image"), (4, "empty"), (5, "needs fields")]:
        lines = [json.dumps(good), json.dumps(bad[i - 1])]
        (tmp_path / "one").mkdir(exist_ok=True)
        (tmp_path / "one" / "test.jsonl").write_text("\n".join(lines))
        (tmp_path / "one" / "img").mkdir(exist_ok=True)
        for name in ("ok.png", "corrupt.png"):
            (tmp_path / "one" / "img" / name).write_bytes((tmp_path / "img" / name).read_bytes())
        with pytest.raises(BadRowError, match=rf"test\.jsonl, row 1: .*{reason}"):
            make(data_path=str(tmp_path / "one")).rows("test")
    with pytest.warns(UserWarning, match="kept 1 of 6 rows, skipped 5 bad rows"):
        rows = make(data_path=str(tmp_path), on_bad_row="skip").rows("test")
    assert [r["answer"] for r in rows] == ["30°"]


def test_train_layout_and_empty_split(tmp_path):
    records = [
        {"image": {"bytes": png(), "path": None}, "problem": "p", "solution": "<answer>2√3</answer>"},
        {"image": {"bytes": b"broken", "path": None}, "problem": "p", "solution": "<answer>1</answer>"},
        {"image": {"bytes": png(), "path": None}, "problem": "p", "solution": "<answer> </answer>"},
    ]
    write_train(tmp_path / "train.parquet", records)
    with pytest.raises(BadRowError, match=r"train\.parquet, row 1: unreadable image"):
        make(data_path=str(tmp_path)).rows("train")
    with pytest.warns(UserWarning, match="skipped 2"):
        task = make(data_path=str(tmp_path), on_bad_row="skip")
        (row,) = task.rows("train")
    assert row["answer"] == "2√3" and task.images(row)[0].size == (20, 20)
    assert (task.skipped_rows("train"), task.skipped_rows("test")) == (2, 0)  # what the trainer logs
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(BadRowError, match="no usable rows"):
        task.rows("test")


def test_tiny_preset_trains(tmp_path, train_preset):
    assert train_preset("geoqa_tiny", tmp_path / "run")
