"""sat and cvbench: multiple-choice spatial reasoning (count, relation, depth, distance).

The paper trains the base Qwen2-VL-2B on SAT (Spatial Aptitude Training, hub `array/SAT`)
and evaluates on CV-Bench (hub `nyu-visionx/CV-Bench`, test split): a training run names
cvbench as its evaluation task (`eval.task: cvbench`). Both become rows of one shape,
{id, image, question, choices, answer, letter, category}, scored the same way: the
<answer> must name the gold option, by its text or by its letter.
"""

from __future__ import annotations

import random
import re
import string
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gpg_vl.datafiles import BadRowError, describe, load_image
from gpg_vl.rewards import ChoiceMatcher, extract_tag, has_think_answer_format
from gpg_vl.settings import check
from gpg_vl.task import IMAGE_MARKER, FileTask, Prompt, Row, ScoreContext, image_chat, register_task

LETTERS = string.ascii_uppercase
# The paper's base-model prompt (VisualThinker-R1-Zero): no chat template, the image where the
# user's turn begins.
BASE_PROMPT = ("A conversation between User and Assistant. The user asks a question about the image, and the "
               "Assistant solves it. The assistant first thinks about the reasoning process in the mind and then "
               "provides the user with the answer.\nUser: " + IMAGE_MARKER + "{question} \nAssistant: Let me "
               "solve this step by step.\n<think>")
# The instruct variant asks for the tags in R1-V's words (the paper ran the base prompt only).
INSTRUCT_SUFFIX = " Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
_LETTER_ONLY = re.compile(r"\(?([A-Za-z])\)?[.:]?")
_LETTER_TEXT = re.compile(r"\(?([A-Za-z])[).:]\s*+(.+)", re.DOTALL)


def checked_choices(choices: Any) -> list[str]:
    """2 to 26 options that the reward can tell apart (ChoiceMatcher refuses two the same)."""
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) \
            or not all(isinstance(c, str) and c.strip() for c in choices):
        raise BadRowError(f"choices must be a list of 2 to 26 non-empty strings, got {describe(choices)}")
    return ChoiceMatcher([c.strip() for c in choices]).choices


def names_gold(answer: str, row: Row) -> bool:
    """Whether an answer names the gold option: its text ("left"), its letter ("C", "(C)") or
    both ("(C) left"), ignoring case, width and spaces. "A or B", "" and a wrong pairing name nothing."""
    matcher, gold = ChoiceMatcher(row["choices"]), row["answer"]
    # Deviation: besides the reference's exact option text, a letter and a final period count too.
    said = unicodedata.normalize("NFKC", answer).strip()
    said = said[:-1] if said.endswith(".") else said
    named = matcher.whole(said)
    if named is not None:  # a text first, so an option spelled like a letter keeps its meaning
        return named == gold
    letter_only, with_text = _LETTER_ONLY.fullmatch(said), _LETTER_TEXT.fullmatch(said)
    if letter_only:
        return letter_only.group(1).upper() == row["letter"]
    if with_text:
        return with_text.group(1).upper() == row["letter"] and matcher.whole(with_text.group(2)) == gold
    return False


@dataclass
class ChoiceOptions:
    prompt: Literal["base", "instruct"] = "base"
    """base: the paper's plain-text prompt for a base model, which opens <think> (so the format is checked on "<think>" + completion); instruct: a chat turn asking for the think/answer tags."""


class ChoiceTask(FileTask):
    """Shared prompt, images and score of sat and cvbench (see their docstrings)."""

    Options = ChoiceOptions
    reward_components = ("accuracy", "format")
    metric_group = "category"  # CV-Bench reports Count, Relation, Depth, Distance and their total

    def prompt(self, row: Row) -> Prompt:
        if self.options.prompt == "base":
            return BASE_PROMPT.format(question=row["question"])
        return image_chat(row["question"] + INSTRUCT_SUFFIX)

    def _full_text(self, completion: str) -> str:
        # The base prompt ends in "<think>", so the model's text continues inside it.
        return "<think>" + completion if self.options.prompt == "base" else completion

    def answer(self, completion: str, row: Row, ctx: ScoreContext) -> str | None:
        """The content of the last <answer>...</answer>."""
        return extract_tag(self._full_text(completion), "answer")

    def score(self, completion: str, row: Row, ctx: ScoreContext) -> dict[str, float]:
        answer = self.answer(completion, row, ctx)
        return {"accuracy": float(answer is not None and names_gold(answer, row)),
                "format": float(has_think_answer_format(self._full_text(completion)))}


@dataclass
class SatOptions(ChoiceOptions):
    max_train_rows: int = 15000
    """The first this many single-image rows of the training split (the paper's 15,000); 0 = all."""
    seed: int = 0
    """Seed of the option shuffle."""

    def __post_init__(self):
        check(self.max_train_rows >= 0, f"max_train_rows must be >= 0 (0 = all), got {self.max_train_rows}")


@register_task("sat")
class SatTask(ChoiceTask):
    """Train on SAT: single-image rows with shuffled options, the gold being the option text.

    Data (`task.data_path`, default the bundled sample; the paper: `array/SAT`): SAT's fields
    `image_bytes` (a list of images: paths, bytes or hub images; rows with two images are left
    out, as the reference did, without decoding them), `question`, `answers` (the options),
    `correct_answer` (one of them) and `question_type` (kept as the row's category). Bad rows:
    a missing field, a missing or unreadable image, fewer than 2 or duplicate options, a gold
    not among them.

    Reward: accuracy 1 when the <answer> names the gold option by its text or its letter (in the
    order listed), else 0; format 1 for <think>...</think> <answer>...</answer>.
    """

    Options = SatOptions

    def max_rows(self, split: str) -> int:
        return self.options.max_train_rows if split == self.config.train_split else 0

    def convert(self, record: dict[str, Any], root: Path | None) -> Row | None:
        """None for a row the reference left out (two images), decided before any image is decoded."""
        images = record["image_bytes"]
        if not isinstance(images, list) or not images:
            raise BadRowError(f"image_bytes must be a non-empty list of images, got {describe(images)}")
        if len(images) != 1:
            return None
        question = record["question"]
        if not isinstance(question, str) or not question.strip():
            raise BadRowError("empty question")
        choices = checked_choices(record["answers"])
        gold = ChoiceMatcher(choices).whole(str(record["correct_answer"]))
        if gold is None:
            raise BadRowError(f"correct_answer {str(record['correct_answer'])!r:.60} is not one of the answers "
                              f"{choices!r:.100}")
        image, _ = load_image(images[0], root)
        # The reference shuffled the options once (SAT lists the right one first); seeded by the
        # row's content, so the order is the same in every run and on every process.
        random.Random(repr((self.options.seed, question, choices))).shuffle(choices)
        listed = ", ".join(choices[:-1]) + " or " + choices[-1]
        return {"image": image, "category": str(record.get("question_type") or ""),
                "question": f"Answer in natural language. {question.strip()} Choose between the following "
                            f"options: {listed}", "choices": choices, "answer": gold,
                "letter": LETTERS[choices.index(gold)]}


@register_task("cvbench")
class CvBenchTask(ChoiceTask):
    """CV-Bench (evaluation only; hub `nyu-visionx/CV-Bench`, split test, 2638 rows).

    Fields as the public CV-Bench uses them: `image` (or `filename`, a path like
    img/2D/count/x.png), `question`, `choices`, `answer` ("(C)"), `task` (the category: Count,
    Relation, Depth, Distance; kept as the row's `category` for a per-category report),
    `prompt` (the question with lettered choices; built from question and choices if absent).

    Reward: accuracy 1 when the <answer> names the gold option by its letter or its text
    (full-width "（Ｂ）" is "(B)"); format as for sat.
    """

    splits = ("test",)

    def convert(self, record: dict[str, Any], root: Path | None) -> Row:
        """A CV-Bench record -> a row; the benchmark's own `prompt` is the question shown."""
        choices = checked_choices(record["choices"])
        m = re.fullmatch(r"\(([A-Z])\)", str(record["answer"]).strip())
        if m is None or LETTERS.index(m.group(1)) >= len(choices):
            raise BadRowError(f"answer must be a letter of the {len(choices)} choices like \"(A)\", "
                              f"got {str(record['answer'])!r:.40}")
        category = record["task"]
        if not isinstance(category, str) or not category.strip():
            raise BadRowError("task (the category: Count, Relation, Depth or Distance) is empty")
        question = record.get("prompt") or (str(record["question"]).strip() + " Select from the following choices.\n"
                                            + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices)))
        image, _ = load_image(record["filename"] if record.get("image") is None else record["image"], root)
        letter = m.group(1)
        return {"image": image, "category": category.strip(), "question": question,
                "choices": choices, "answer": choices[LETTERS.index(letter)], "letter": letter}
