"""geoqa: geometry questions about a diagram, answered with a number (GeoQA as R1-V prepared it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpg_vl.datafiles import BadRowError, load_image, text_field
from gpg_vl.rewards import extract_tag, has_think_answer_format, normalize_number, numbers_match, symbolic_equal
from gpg_vl.task import FileTask, Prompt, Row, ScoreContext, image_chat, register_task

TEMPLATE = ("{question}  Output the thinking process in <think> </think> and final answer (number) "
            "in <answer> </answer> tags.")
# Unicode a model or the data may write, as the LaTeX that math-verify reads.
LATEX = {"°": "", "√": "\\sqrt", "π": "\\pi", "∠": ""}


def convert(record: dict[str, Any], root: Path | None) -> Row:
    """A train record {image, problem, solution="<answer>140</answer>"} or a test record
    {image_path, question, ground_truth="140°"}, as one row {question, answer, image}."""
    if record.get("problem") is not None:  # parquet fills a missing column with nulls
        question, solution, image = text_field(record, "problem").strip(), text_field(record, "solution"), record["image"]
        answer = extract_tag(solution)  # R1-V wraps the train answers in <answer> tags
        answer = solution.strip() if answer is None else answer
    elif record.get("question") is not None:
        question, answer, image = text_field(record, "question").strip(), text_field(record, "ground_truth").strip(), \
            record["image_path"]
    else:
        raise BadRowError("needs fields image, problem, solution (train) or image_path, question, ground_truth (test)")
    if not answer:
        raise BadRowError("empty answer")
    return {"question": question, "answer": answer, "image": load_image(image, root)[0]}


@register_task("geoqa")
class GeoQATask(FileTask):
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
    """

    reward_components = ("accuracy", "format")

    def convert(self, record: dict[str, Any], root: Path | None) -> Row:
        return convert(record, root)

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
