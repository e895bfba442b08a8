"""`gpg-vl eval` end to end with the tiny models: every task's bundled sample, the records,
resume, two processes, masks, the merge command and the error messages."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gpg_vl.evaluate as ev
from gpg_vl.cli import main
from gpg_vl.eval_metrics import encode_rle
from gpg_vl.evaluate import EvalError, EvalSettings, Part, evaluate, item_record
from gpg_vl.scoring import score_completions
from gpg_vl.task import ScoreContext, Task, TaskConfig, build_task

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "assets" / "tiny"
SAMPLES = ROOT / "assets" / "samples"
COIN = str(ROOT / "tests" / "plugins" / "coin_task.py")
CATEGORIES = ["Count", "Relation", "Depth", "Distance", "Total"]


def settings(out: Path, task: str, model: str, **kw) -> EvalSettings:
    base = dict(output_dir=str(out), max_new_tokens=4, max_pixels=12544, limit=4, batch_size=4)
    return EvalSettings(task=task, model=str(TINY / model), **{**base, **kw})


def items(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]


def without_settings(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "settings"}


@pytest.mark.parametrize("task, model, options, columns", [
    ("lisa", "qwen2_vl", {}, ["mIoU"]),
    ("flower102", "qwen2_vl", {}, ["accuracy"]),
    ("pets37", "qwen2_vl", {}, ["accuracy"]),
    ("fgvc_aircraft", "qwen2_vl", {}, ["accuracy"]),
    ("cars196", "qwen2_vl", {}, ["accuracy"]),
    ("geoqa", "qwen2_5_vl", {}, ["accuracy"]),
    ("sat", "qwen2_vl", {"cvbench_path": str(SAMPLES / "cvbench")}, CATEGORIES),
    ("cvbench", "qwen2_vl", {}, CATEGORIES),
    ("math", "qwen2", {}, ["pass@1"]),
    ("math_rs", "qwen2", {}, ["pass@1"]),
])
def test_every_task_sample_evaluates(tmp_path, task, model, options, columns):
    summary = evaluate(settings(tmp_path, task, model, options=options))
    assert list(summary["columns"]) == columns
    assert summary["parts"][0]["items"] == 4 and summary["parts"][0]["data"] == "bundled sample"
    records = items(tmp_path)
    components = build_task(TaskConfig(name=task, options=options)).reward_components
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    for r in records:
        assert r["prompt"] and len(r["completions"]) == len(r["answers"]) == len(r["scores"]) == 1
        assert set(r["scores"][0]) == set(components) and r["failed"] == [False]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "table.md").read_text().startswith("| model | " + " | ".join(columns) + " |")


def test_a_record_holds_the_prompt_the_parsed_box_and_the_score():
    from gpg_vl.models import load_adapter

    adapter = load_adapter(str(TINY / "qwen2_vl"), max_pixels=12544)
    task = build_task(TaskConfig(name="lisa"))
    row = task.rows("test")[0]
    ctx = ScoreContext(boxes=adapter.box_convention)
    gold = adapter.box_convention.from_pixels(tuple(row["box"]), tuple(row["image_size"]))  # the 0-1000 grid
    right = f"<think>it is there</think> <answer>({gold[0]},{gold[1]}),({gold[2]},{gold[3]})</answer>"
    prompt = adapter.encode(task.prompt(row), task.images(row)).text
    texts = [right, "no idea"]
    record = item_record(Part("test", "test", "", task, [row]), 0, row, prompt, texts,
                         score_completions(task, texts, [row] * 2, ctx), ctx)
    assert record["prompt"] == adapter.render(task.prompt(row)) and "Output the bounding box" in record["prompt"]
    assert record["id"] == row["id"] and record["completions"] == [right, "no idea"]
    assert record["answers"][0] == pytest.approx(row["box"], abs=0.1) and record["answers"][1] is None
    assert record["scores"][0]["iou"] > 0.99 and record["scores"][1] == {"accuracy": 0.0, "format": 0.0, "iou": 0.0}


class Brittle(Task):
    """A reward that raises on "boom" and a parser that raises on "YES" (which the reward alone
    would score 1)."""

    def rows(self, split):
        return [{"id": "only"}]

    def prompt(self, row):
        return "q"

    def score(self, completion, row, ctx):
        if completion == "boom":
            raise RuntimeError("reward bug")
        return {"accuracy": float(completion.casefold() == "yes")}

    def answer(self, completion, row, ctx):
        if completion == "YES":
            raise ValueError("parser bug")
        return completion


def test_a_failing_reward_or_parser_is_a_flagged_zero():
    from gpg_vl.models import load_adapter

    adapter = load_adapter(str(TINY / "qwen2"))
    task = Brittle(TaskConfig(name="brittle", reward_workers=0))  # the pool's own failures: tests/test_scoring.py
    row, ctx = task.rows("test")[0], ScoreContext(boxes=adapter.box_convention)
    texts = ["yes", "boom", "YES"]
    scored = score_completions(task, texts, [row] * 3, ctx)
    record = item_record(Part("test", "test", "", task, [row]), 0, row, "q", texts, scored, ctx)
    assert [s["accuracy"] for s in record["scores"]] == [1.0, 0.0, 0.0]
    assert record["failed"] == [False, True, True] and record["answers"] == ["yes", "boom", None]


def coin(out: Path, **kw) -> EvalSettings:
    """A plugin whose score depends on the sampled completion: metrics strictly between 0 and 100."""
    return settings(out, COIN, "qwen2", **{**dict(temperature=1.0, samples=2, max_new_tokens=3, limit=22), **kw})


def test_resume_after_an_interruption_gives_the_same_records_and_summary(tmp_path, monkeypatch):
    whole = evaluate(coin(tmp_path / "whole"))
    assert 0 < whole["columns"]["accuracy"] < 100 and 0 < whole["columns"]["mean@2"] < 100
    lines = (tmp_path / "whole" / "items.jsonl").read_text().splitlines(keepends=True)
    for leftover in ("items.rank0.jsonl", "items.jsonl"):  # as a killed run leaves it; a cut merged file
        cut = tmp_path / f"cut_{leftover}"
        cut.mkdir()
        shutil.copy(tmp_path / "whole" / "settings.json", cut)
        (cut / leftover).write_text("".join(lines[:9]) + lines[9][:40])  # 9 items and half a line
        assert without_settings(evaluate(coin(cut))) == without_settings(whole)
        assert items(cut) == items(tmp_path / "whole")
    monkeypatch.setattr(ev, "run_batch", lambda *a: pytest.fail("a finished evaluation generated again"))
    assert without_settings(evaluate(coin(tmp_path / "whole"))) == without_settings(whole)
    with pytest.raises(EvalError, match="other settings .*temperature: 1.0 then, 0.7 now"):
        evaluate(coin(tmp_path / "whole", temperature=0.7))


def test_two_processes_write_what_one_process_writes(tmp_path):
    one = evaluate(coin(tmp_path / "one"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    cmd = ["bash", "scripts/eval_task.sh", COIN, str(TINY / "qwen2"), "--nproc", "2", "--output", str(tmp_path / "two"),
           "--temperature", "1.0", "--samples", "2", "--max-new-tokens", "3", "--limit", "22", "--batch-size", "4",
           "--max-pixels", "12544"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert items(tmp_path / "two") == items(tmp_path / "one")
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert without_settings(two) == without_settings(one)


def test_masks_from_a_segmenter_give_giou_and_ciou(tmp_path):
    raw = str(SAMPLES / "lisa" / "reasonseg")
    task = build_task(TaskConfig(name="lisa", data_path=raw))
    rows = task.rows("test")[:4]
    masks = {r["id"]: encode_rle(task.gold_mask(r) == 1) for r in rows[:3]}  # perfect masks, the last one missing
    (tmp_path / "masks.json").write_text(json.dumps(masks))
    summary = evaluate(settings(tmp_path / "raw", "lisa", "qwen2_vl", data_path=raw,
                                pred_masks=str(tmp_path / "masks.json")))
    part = summary["parts"][0]
    assert part["masks_missing"] == 1 and part["metrics"]["gIoU"] == pytest.approx(75.0)  # (1 + 1 + 1 + 0) / 4
    areas = [int((task.gold_mask(r) == 1).sum()) for r in rows]
    assert part["metrics"]["cIoU"] == pytest.approx(100 * sum(areas[:3]) / sum(areas))
    with pytest.raises(EvalError, match="no gold mask"):  # processed rows keep boxes only
        evaluate(settings(tmp_path / "processed", "lisa", "qwen2_vl", pred_masks=str(tmp_path / "masks.json")))


def test_lisa_splits_and_a_math_suite_side_by_side(tmp_path):
    summary = evaluate(settings(tmp_path / "lisa", "lisa", "qwen2_vl", splits=["test", "train"], limit=2))
    assert list(summary["columns"]) == ["test mIoU", "train mIoU"]
    suite = {"aime24": str(SAMPLES / "math"), "amc23": str(SAMPLES / "math_rs" / "test.jsonl")}
    summary = evaluate(settings(tmp_path / "math", "math", "qwen2", benchmarks=suite, limit=2))
    assert list(summary["columns"]) == ["aime24 pass@1", "amc23 pass@1", "average pass@1"]
    assert [r["part"] for r in items(tmp_path / "math")] == ["aime24", "aime24", "amc23", "amc23"]


def test_the_summary_counts_the_bad_rows_skipped(tmp_path):
    rows = [{"question": "1 + 1?", "answer": "2"}, {"question": "no answer"}, {"question": "2 + 2?", "answer": "4"},
            {"question": "3 + 3?", "answer": "6", "deep": json.loads("[" * 120 + "]" * 120)}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = settings(tmp_path / "out", "math", "qwen2", data_path=str(tmp_path))
    with pytest.raises(EvalError, match="test.jsonl, row 1: no answer field"):
        evaluate(s)
    with pytest.warns(UserWarning, match="skipped 2 bad rows"):
        summary = evaluate(settings(tmp_path / "out", "math", "qwen2", data_path=str(tmp_path), on_bad_row="skip"))
    assert summary["parts"][0]["items"] == 2 and summary["parts"][0]["skipped_rows"] == 2


@pytest.mark.parametrize("args, message", [
    (["--task", "lisa", "--split", "val"], "cannot read split 'val' of the bundled sample"),
    (["--task", "lisa", "--data-path", "/no/such/folder"], "data path not found: /no/such/folder"),
    (["--task", "lisa", "--model", "runs/no/such/model"], "model path not found: runs/no/such/model"),
    (["--task", "lisaa"], "Did you mean 'lisa'"),
    (["--task", "math", "--data", "aime24"], "--data takes KEY=VALUE"),
    (["--task", "lisa", "--samples", "4"], "greedy decoding"),
    (["--task", "cvbench", "--option", "prompt=chat"], "prompt must be base or instruct"),
    (["--task", "lisa", "--pred-masks", "/no/masks.json"], "mask file not found"),
])
def test_clear_errors(tmp_path, capsys, args, message):
    model = [] if "--model" in args else ["--model", str(TINY / "qwen2_vl")]
    assert main(["eval", *args, *model, "--output", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_eval_merge_command(tmp_path, capsys):
    for name, value in (("a", 40.0), ("b", 60.0)):
        summary = {"task": "geoqa", "name": name, "columns": {"accuracy": value}, "headline": value}
        (tmp_path / f"{name}.json").write_text(json.dumps(summary))
    args = ["eval-merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--names", "base,gpg"]
    assert main([*args, "--out", str(tmp_path / "t.md")]) == 0
    table = capsys.readouterr().out
    assert table == (tmp_path / "t.md").read_text() and "| gpg | 60.00 |" in table
    assert main(["eval-merge", str(tmp_path / "none.json")]) == 2
    assert "summary not found" in capsys.readouterr().err


def test_a_training_checkpoint_folder_stands_for_its_hf_model(tmp_path):
    (tmp_path / "step_000010" / "hf").mkdir(parents=True)
    (tmp_path / "step_000010" / "hf" / "config.json").write_text("{}")
    assert ev.model_path(str(tmp_path / "step_000010")) == str(tmp_path / "step_000010" / "hf")
    assert ev.model_path("Qwen/Qwen2-VL-2B-Instruct") == "Qwen/Qwen2-VL-2B-Instruct"  # a hub name, left to the hub


def test_pixel_limits_default_to_those_the_checkpoint_was_trained_with(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000007" / "hf").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  min_pixels: 784\n  max_pixels: 12544\ntrain:\n  seed: 0\n")
    for model in (run / "checkpoints" / "step_000007", run / "checkpoints" / "step_000007" / "hf"):
        assert ev.pixel_limits(EvalSettings(task="shapes", model=str(model))) == (784, 12544)
        assert ev.pixel_limits(EvalSettings(task="shapes", model=str(model), max_pixels=50176)) == (784, 50176)
    assert ev.pixel_limits(EvalSettings(task="shapes", model="Qwen/Qwen2-VL-2B-Instruct")) == (3136, 401408)
