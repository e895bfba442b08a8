"""The `sat` (SAT training) and `cvbench` (CV-Bench evaluation) tasks: loaders, prompts (the
base prompt carries the image placeholder), golden completions, bad rows, a tiny run."""

import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from gpg_vl.boxes import PixelBoxes
from gpg_vl.datafiles import BadRowError
from gpg_vl.models import load_adapter
from gpg_vl.task import IMAGE_MARKER, ScoreContext, TaskConfig, build_task, task_names

REPO = Path(__file__).resolve().parent.parent
CTX = ScoreContext(PixelBoxes())
SAT_ROW = {"id": "s", "image": "", "category": "relation", "question": "q", "choices": ["left", "right", "above"],
           "answer": "right", "letter": "B"}
CV_ROW = {"id": "c", "image": "", "category": "Count", "question": "q", "choices": ["3", "2", "1", "0"],
          "answer": "1", "letter": "C"}


def make(name="sat", **config):
    return build_task(TaskConfig(name=name, **config))


def test_registered_and_sample_rows():
    assert {"sat", "cvbench"} <= set(task_names())
    sat = make()
    train, test = sat.rows("train"), sat.rows("test")
    assert (len(train), len(test)) == (11, 7)  # 12 and 8 rows, the first of each has two images
    for row in train + test:
        assert row["answer"] in row["choices"] and row["choices"].index(row["answer"]) == "ABC".index(row["letter"])
        listed = ", ".join(row["choices"][:-1]) + " or " + row["choices"][-1]
        assert row["question"].startswith("Answer in natural language. ")
        assert row["question"].endswith(f" Choose between the following options: {listed}")
        assert sat.images(row)[0].size == (64, 64)
    assert make().rows("train") == train  # the shuffle is seeded
    cv = make("cvbench").rows("test")
    assert Counter(r["category"] for r in cv) == {"Count": 3, "Relation": 3, "Depth": 3, "Distance": 3}
    assert all(r["question"].endswith("\n".join(f"({L}) {c}" for L, c in zip("ABCD", r["choices"]))) for r in cv)


def test_options_are_shuffled(tmp_path):
    # SAT lists the correct answer first; after the shuffle it is first about half the time.
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    records = [{"image_bytes": ["a.png"], "question": f"Q{i}?", "answers": ["yes", "no"], "correct_answer": "yes"}
               for i in range(200)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    rows = make(data_path=str(tmp_path), options={"max_train_rows": 0}).rows("train")
    first = sum(r["letter"] == "A" for r in rows)
    assert 70 < first < 130 and all(r["answer"] == "yes" for r in rows)
    assert make(data_path=str(tmp_path), options={"seed": 1}).rows("train") != rows
    assert len(make(data_path=str(tmp_path), options={"max_train_rows": 5}).rows("train")) == 5
    assert len(make().rows("train")) == 11 and len(make(options={"max_train_rows": 3}).rows("test")) == 7


def test_base_prompt_carries_the_image_and_opens_think():
    sat = make()
    row = sat.rows("train")[0]
    prompt = sat.prompt(row)
    # The task marks the image; it writes no model family's tokens.
    assert prompt == ("A conversation between User and Assistant. The user asks a question about the image, and the "
                      "Assistant solves it. The assistant first thinks about the reasoning process in the mind and "
                      f"then provides the user with the answer.\nUser: {IMAGE_MARKER}"
                      f"{row['question']} \nAssistant: Let me solve this step by step.\n<think>")
    # Each Qwen-VL adapter expands the marker to its image tokens: the raw string needs no template.
    for family in ("qwen2_vl", "qwen2_5_vl"):
        adapter = load_adapter(f"tiny:{family}", max_pixels=12544)
        assert adapter.render(prompt) == prompt.replace(IMAGE_MARKER, "<|vision_start|><|image_pad|><|vision_end|>")
        encoded = adapter.encode(prompt, sat.images(row))
        pad = adapter.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        grid = adapter.processor.image_processor.merge_size ** 2
        assert int((encoded.input_ids == pad).sum()) == int(encoded.image_grid_thw.prod()) // grid > 1
    with pytest.raises(ValueError, match="text-only model but the prompt has images"):
        load_adapter("tiny:qwen2").render(prompt)


def test_instruct_prompt():
    for name in ("sat", "cvbench"):
        task = make(name, options={"prompt": "instruct"})
        row = task.rows("test")[0]
        (message,) = task.prompt(row)
        assert message["content"][0] == {"type": "image"}
        assert message["content"][1]["text"] == row["question"] + (
            " Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.")


# Base prompt: the completion continues after "<think>".
@pytest.mark.parametrize("completion,accuracy,fmt", [
    ("the red one is on the right</think> <answer>right</answer>", 1, 1),
    ("x</think><answer> Right </answer>", 1, 1),
    ("x</think><answer>RIGHT.</answer>", 1, 1),
    ("x</think><answer>B</answer>", 1, 1),
    ("x</think><answer>(B)</answer>", 1, 1),
    ("x</think><answer>(B) right</answer>", 1, 1),
    ("x</think><answer>(A) right</answer>", 0, 1),  # letter and text disagree
    ("x</think><answer>left</answer>", 0, 1),
    ("x</think><answer>A</answer>", 0, 1),
    ("x</think><answer>left or right</answer>", 0, 1),
    ("x</think><answer>right or left</answer>", 0, 1),
    ("x</think><answer>B or A</answer>", 0, 1),
    ("x</think><answer>the right one</answer>", 0, 1),
    ("x</think><answer></answer>", 0, 1),
    ("x</think><answer>右</answer>", 0, 1),
    ("<think>x</think><answer>right</answer>", 1, 1),  # repeating the opening tag is harmless
    ("<answer>right</answer>", 1, 0),  # no </think>
    ("right", 0, 0),
    ("", 0, 0),
    ("思考 ça 🙂</think><answer>right</answer>", 1, 1),
    ("x" * 100_000 + "</think><answer>right</answer>", 1, 1),
    ("<answer>" * 50_000, 0, 0),
    ("</think><answer>" + "right " * 20_000 + "</answer>", 0, 1),
])
def test_sat_golden_completions(completion, accuracy, fmt):
    start = time.perf_counter()
    assert make().score(completion, SAT_ROW, CTX) == {"accuracy": accuracy, "format": fmt}
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("completion,accuracy,fmt", [
    ("<think>x</think><answer>right</answer>", 1, 1),
    ("x</think><answer>right</answer>", 1, 0),  # the instruct prompt does not open <think>
    ("right", 0, 0),
])
def test_sat_instruct_golden_completions(completion, accuracy, fmt):
    assert make(options={"prompt": "instruct"}).score(completion, SAT_ROW, CTX) == {"accuracy": accuracy, "format": fmt}


@pytest.mark.parametrize("answer,accuracy", [
    ("(C)", 1), ("C", 1), ("c", 1), ("C.", 1), ("1", 1), ("(C) 1", 1), ("C: 1", 1),
    ("(C) 2", 0), ("(A)", 0), ("3", 0), ("(C) or (A)", 0), ("C or A", 0), ("", 0), ("(CC)", 0),
])
def test_cvbench_golden_answers(answer, accuracy):
    got = make("cvbench").score(f"x</think><answer>{answer}</answer>", CV_ROW, CTX)
    assert got == {"accuracy": accuracy, "format": 1}


@pytest.mark.parametrize("name", ["sat", "cvbench"])
def test_gold_scores_one_and_guessing_scores_chance(name):
    task = make(name)
    rows = task.rows("test")
    rng, guessed = random.Random(0), []
    for row in rows:
        for said in (row["answer"], row["letter"], f"({row['letter']}) {row['answer']}"):
            assert task.score(f"r</think> <answer>{said}</answer>", row, CTX) == {"accuracy": 1, "format": 1}
        # Each row: exactly one option scores, so a uniform guess scores 1/len(choices).
        hits = [task.score(f"r</think><answer>{c}</answer>", row, CTX)["accuracy"] for c in row["choices"]]
        assert sum(hits) == 1
        guessed.append(task.score(f"r</think><answer>{rng.choice(row['choices'])}</answer>", row, CTX)["accuracy"])
    assert 0 <= sum(guessed) < len(rows)


@pytest.mark.parametrize("name,options,message", [
    ("sat", {"promt": "base"}, "did you mean prompt"), ("sat", {"prompt": "chat"}, "one of base, instruct"),
    ("sat", {"max_train_rows": -1}, "max_train_rows"), ("sat", {"max_train_rows": 1.5}, "max_train_rows"),
    ("sat", {"seed": True}, "seed"),
    ("cvbench", {"seed": 1}, "unknown option 'seed'"), ("cvbench", {"prompt": None}, "one of base, instruct"),
])
def test_bad_options(name, options, message):
    with pytest.raises(ValueError, match=f"(?i){message}"):
        make(name, options=options)


# ---------------------------------------------------------------- bad rows

SAT_GOOD = {"image_bytes": ["a.png"], "question": "Left or right?", "answers": ["left", "right"],
            "correct_answer": "left", "question_type": "relation"}
CV_GOOD = {"idx": 0, "type": "2D", "task": "Count", "filename": "a.png", "question": "How many?",
           "choices": ["1", "2"], "answer": "(A)", "prompt": "How many? Select from the following choices.\n(A) 1\n(B) 2"}


def write(tmp_path: Path, split: str, records: list) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG broken")
    (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in records))


def drop(record: dict, key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


@pytest.mark.parametrize("name,good,bad,message", [
    ("sat", SAT_GOOD, drop(SAT_GOOD, "correct_answer"), "missing field 'correct_answer'"),
    ("sat", SAT_GOOD, drop(SAT_GOOD, "image_bytes"), "missing field 'image_bytes'"),
    ("sat", SAT_GOOD, {**SAT_GOOD, "image_bytes": ["gone.png"]}, "image not found"),
    ("sat", SAT_GOOD, {**SAT_GOOD, "image_bytes": ["corrupt.png"]}, "unreadable image"),
    ("sat", SAT_GOOD, {**SAT_GOOD, "image_bytes": []}, "non-empty list"),
    ("sat", SAT_GOOD, {**SAT_GOOD, "correct_answer": "up"}, "not one of the answers"),
    ("sat", SAT_GOOD, {**SAT_GOOD, "answers": ["left", "Left "]}, "are the same once case"),
    ("sat", SAT_GOOD, {**SAT_GOOD, "answers": ["left"]}, "2 to 26"),
    ("sat", SAT_GOOD, {**SAT_GOOD, "question": ""}, "empty question"),
    ("cvbench", CV_GOOD, drop(CV_GOOD, "task"), "missing field 'task'"),
    ("cvbench", CV_GOOD, drop(CV_GOOD, "filename"), "missing field 'filename'"),
    ("cvbench", CV_GOOD, {**CV_GOOD, "filename": "gone.png"}, "image not found"),
    ("cvbench", CV_GOOD, {**CV_GOOD, "filename": "corrupt.png"}, "unreadable image"),
    ("cvbench", CV_GOOD, {**CV_GOOD, "answer": "(C)"}, "letter of the 2 choices"),
    ("cvbench", CV_GOOD, {**CV_GOOD, "answer": "1"}, "letter of the 2 choices"),
    ("cvbench", CV_GOOD, {**CV_GOOD, "task": " "}, "category"),
])
def test_bad_rows(tmp_path, name, good, bad, message):
    write(tmp_path, "test", [good, bad, good])
    with pytest.raises(BadRowError, match=f"test.jsonl, row 1: .*{message}"):
        make(name, data_path=str(tmp_path)).rows("test")
    with pytest.warns(UserWarning, match="kept 2 of 3 rows, skipped 1"):
        assert len(make(name, data_path=str(tmp_path), on_bad_row="skip").rows("test")) == 2


def test_empty_and_two_image_splits(tmp_path):
    write(tmp_path, "test", [])
    with pytest.raises(BadRowError, match="no usable rows"):
        make(data_path=str(tmp_path)).rows("test")
    write(tmp_path, "test", [{**SAT_GOOD, "image_bytes": ["a.png", "a.png"]}])
    with pytest.raises(BadRowError, match="left out 1 by the task's rules"):
        make(data_path=str(tmp_path)).rows("test")
    with pytest.raises(FileNotFoundError):
        make("cvbench").rows("train")  # CV-Bench is a test set only


def test_cvbench_without_prompt_field(tmp_path):
    write(tmp_path, "test", [drop(CV_GOOD, "prompt")])
    (row,) = make("cvbench", data_path=str(tmp_path)).rows("test")
    assert row["question"] == CV_GOOD["prompt"] and (row["answer"], row["letter"]) == ("1", "A")
