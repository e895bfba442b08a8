"""geoqa: geometry questions about a diagram, answered with a number (GeoQA as R1-V prepared it)."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from gpg_vl.datafiles import BadRowError, ImageRowTask, load_split, open_image
from gpg_vl.rewards import extract_tag, has_think_answer_format, normalize_number, numbers_match, symbolic_equal
from gpg_vl.task import Prompt, Row, ScoreContext, TaskConfig, image_chat, register_task

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "assets" / "samples" / "geoqa"
TEMPLATE = ("{question}  Output the thinking process in <think> </think> and final answer (number) "
            "in <answer> </answer> tags.")
# Unicode a model or the data may write, as the LaTeX that math-verify reads.
LATEX = {"°": "", "√": "\\sqrt", "π": "\\pi", "∠": ""}


def _text(record: dict[str, Any], field: str) -> str:
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        raise BadRowError(f"field {field!r} is empty or not text")
    return value.strip()


def _image_ref(value: Any, root: Path | None) -> Any:
    """What images() re-opens: an absolute path for a file, else the embedded image itself."""
    rel = value.get("path") if isinstance(value, dict) and not value.get("bytes") else value
    if isinstance(rel, str):
        return str((root / rel).resolve()) if root is not None else rel
    return value


def convert(record: dict[str, Any], root: Path | None) -> Row:
    """A train record {image, problem, solution="<answer>140</answer>"} or a test record
    {image_path, question, ground_truth="140°"}, as one row {question, answer, image}."""
    if record.get("problem") is not None:  # parquet fills a missing column with nulls
        question, solution, image = _text(record, "problem"), _text(record, "solution"), record["image"]
        answer = extract_tag(solution)  # R1-V wraps the train answers in <answer> tags
        answer = solution if answer is None else answer
    elif record.get("question") is not None:
        question, answer, image = _text(record, "question"), _text(record, "ground_truth"), record["image_path"]
    else:
        raise BadRowError("needs fields image, problem, solution (train) or image_path, question, ground_truth (test)")
    if not answer:
        raise BadRowError("empty answer")
    open_image(image, root)  # a missing or corrupt image fails here, at load time
    return {"question": question, "answer": answer, "image": _image_ref(image, root)}


@register_task("geoqa")
class GeoQATask(ImageRowTask):
    """GeoQA: a geometry diagram and a question; the answer is a number (often an angle, "140°").

    Data: GeoQA as R1-V published it. Train (hub `leonardPKU/GEOQA_R1V_Train_8K`, or a local
    train.parquet/.json/.jsonl): fields `image` (a file path or an embedded image), `problem`,
    `solution` ("<answer>140</answer>" or the bare answer). Test (R1-V's
    `geoqa_test_prompts.jsonl`, 754 rows): fields `image_path` (relative to task.image_root, e.g.
    "./images/test/0.png"), `question`, `ground_truth`. Either layout is accepted in either split.

    Reward: "accuracy" is 1 when the last <answer>...</answer> holds the ground truth, compared as
    numbers first ("140", "140°", " 140 " and "140 degrees" all match "140°", relative tolerance
    1e-4) and otherwise symbolically with math-verify ("2\\sqrt{3}" matches "\\sqrt{12}") under the
    time limit task.reward_timeout_s; "format" is 1 for the whole completion being <think>...</think><answer>...</answer>.
    The training reward is their sum.

    Options: none.
    """

    reward_components = ("accuracy", "format")

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        self.options_with_defaults({})  # geoqa takes no options
        self._rows: dict[str, list[Row]] = {}

    def rows(self, split: str) -> list[Row]:
        if split not in self._rows:
            self._rows[split] = load_split(self, self.config.data_path or str(SAMPLE_DIR), split, convert)
        return self._rows[split]

    def prompt(self, row: Row) -> Prompt:
        text = TEMPLATE.format(question=row["question"])
        return image_chat(text)

    def matches(self, answer: str, gold: str) -> bool:
        if numbers_match(answer, gold):
            return True
        if normalize_number(answer) is not None and normalize_number(gold) is not None:
            return False  # two different plain numbers: nothing symbolic left to find
        for uni, tex in LATEX.items():
            answer, gold = answer.replace(uni, tex), gold.replace(uni, tex)
        return symbolic_equal(answer, gold, self.config.reward_timeout_s)

    def answer(self, completion: str, row: Row, ctx: ScoreContext) -> str | None:
        """The content of the last <answer>...</answer>."""
        return extract_tag(completion, "answer")

    def score(self, completion: str, row: Row, ctx: ScoreContext) -> dict[str, float]:
        answer = self.answer(completion, row, ctx)
        # Deviation: no exact-string fallback as in the reference; numbers and symbols cover it.
        correct = bool(answer) and self.matches(answer, row["answer"])
        return {"accuracy": float(correct), "format": float(has_think_answer_format(completion))}

    # ------------------------------------------------------------ the bundled sample

    @classmethod
    def make_samples(cls, folder: Path, per_split: int = 10, seed: int = 0) -> None:
        """A few synthetic diagrams with questions in GeoQA's two layouts: train.parquet with
        embedded PNGs as on the hub, test.jsonl with image files as R1-V's test file."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rng = random.Random(seed)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "images" / "test").mkdir(parents=True, exist_ok=True)
        train, test = [], []
        for i in range(2 * per_split):
            image, question, answer = _problem(rng, i)
            buf = io.BytesIO()
            image.save(buf, format="PNG", optimize=True)
            if i < per_split:
                train.append({"image": {"bytes": buf.getvalue(), "path": f"{i}.png"}, "problem": question,
                              "solution": f"<answer>{answer}</answer>"})
            else:
                rel = f"./images/test/{i - per_split}.png"
                (folder / rel).write_bytes(buf.getvalue())
                test.append({"image_path": rel, "question": question, "ground_truth": f"{answer}°"})
        pq.write_table(pa.Table.from_pylist(train), folder / "train.parquet")
        (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))


def _problem(rng: random.Random, i: int) -> tuple[Image.Image, str, int]:
    """A diagram, its question and the answer in degrees: a triangle's third angle, or the
    supplement of an angle on a straight line."""
    image = Image.new("L", (96, 96), 255)
    draw = ImageDraw.Draw(image)
    a, b = rng.randrange(30, 80, 5), rng.randrange(30, 70, 5)
    if i % 2 == 0:
        draw.polygon([(10, 85), (86, 85), (30 + a // 2, 12)], outline=0)
        for xy, name in (((4, 82), "B"), ((88, 82), "C"), ((27 + a // 2, 2), "A")):
            draw.text(xy, name, fill=0)
        question = f"As shown in the figure, in triangle ABC, angle A = {a}°, angle B = {b}°, then angle C is ()"
        return image, question, 180 - a - b
    draw.line([(6, 70), (90, 70)], fill=0)
    end = (48 + int(40 * math.cos(math.radians(a))), 70 - int(40 * math.sin(math.radians(a))))
    draw.line([(48, 70), end], fill=0)
    draw.text((60, 58), "1", fill=0)
    draw.text((34, 58), "2", fill=0)
    draw.text((45, 73), "O", fill=0)
    question = f"As shown in the figure, point O lies on a straight line, angle 1 = {a}°, then angle 2 is ()"
    return image, question, 180 - a
