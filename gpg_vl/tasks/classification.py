"""flower102, pets37, fgvc_aircraft, cars196: 4-shot fine-grained image classification.

Visual-RFT's data: one image per row, `problem` (the prompt), `solution` =
"<answer>class name</answer>". The reward closes the exploits of the reference's substring
match (Visual-RFT issues 79 and 176) by matching the answer against the task's class list:
the answer must name exactly one class, and that class must be the gold one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from gpg_vl.datafiles import BadRowError, load_image
from gpg_vl.rewards import ChoiceMatcher, choice_key, extract_tag, has_think_answer_format
from gpg_vl.task import FileTask, Prompt, Row, ScoreContext, TaskConfig, image_chat, register_task

CLASSES_FILE = "classes.txt"
# The reference's instruction, verbatim (its missing space after "tags." and its "species
# name" on every data set included), so that prompts tokenize as in the paper's runs.
FORMAT_INSTRUCTION = ("Output the thinking process in <think> </think> and final answer in <answer> </answer> "
                      "tags.The output answer format should be as follows:\n<think> ... </think> "
                      "<answer>species name</answer>\nPlease strictly follow the format.")


def read_class_list(path: Path) -> ChoiceMatcher:
    """Class names from a .txt file (one per line, the reference's format) or a .json list."""
    if not path.is_file():
        raise FileNotFoundError(f"class list not found: {path}")
    if path.suffix == ".json":
        names = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path} must hold a JSON list of class names")
    else:
        names = path.read_text(encoding="utf-8").splitlines()
    try:
        return ChoiceMatcher([n.strip() for n in names if n.strip()])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def gold_answer(solution: Any) -> str:
    """The class name of a `solution`: "<answer>name</answer>" or the bare name."""
    if not isinstance(solution, str):
        raise BadRowError(f"solution must be a string, got {type(solution).__name__}")
    tagged = extract_tag(solution, "answer")
    gold = solution.strip() if tagged is None else tagged
    if not choice_key(gold):
        raise BadRowError(f"empty answer in solution {solution!r:.80}")
    return gold


@dataclass
class ClassificationOptions:
    classes_file: str = ""
    """Class list (.txt, one name per line, or a .json list); empty = classes.txt in the data folder, else the distinct answers of the training split (a 4-shot training set holds every class). A row whose answer is not in the list is a bad row."""


class ClassificationTask(FileTask):
    """Name the class of the object in one image (Visual-RFT's 4-shot fine-grained sets).

    Data (`task.data_path`): the task's hub set, or a folder with `train.jsonl` and
    `test.jsonl` (or .json / .parquet) whose rows hold `image` (a path relative to the data
    folder or `task.image_root`, or the image itself as bytes), `solution`
    ("<answer>class name</answer>" or the bare name) and optionally `problem` (the prompt
    text: used as written when it holds the think/answer instruction, else the instruction
    is appended to it, or to the reference's question when there is none), and optionally
    `classes.txt` beside them.

    Reward: accuracy 1 iff the last <answer>...</answer> names exactly one class of the list
    and it is the gold one (`ChoiceMatcher.named`: the whole answer is the class, or the
    class occurs in it as whole words; case, width, spaces, underscores and hyphens do not
    matter); format 1 iff the completion is <think>...</think> <answer>...</answer>.
    """

    Options = ClassificationOptions
    reward_components = ("accuracy", "format")
    article: ClassVar[str] = "an"
    noun: ClassVar[str] = "object"
    attribute: ClassVar[str] = "class"

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        given = self.options.classes_file
        path = Path(given).expanduser() if given else self._default_class_file()
        self._matcher = read_class_list(path) if path is not None else None

    def _default_class_file(self) -> Path | None:
        local = Path(self.data_path).expanduser()
        path = (local if local.is_dir() else local.parent) / CLASSES_FILE
        return path if local.exists() and path.is_file() else None

    @property
    def matcher(self) -> ChoiceMatcher:
        if self._matcher is None:  # no class list: the distinct answers of the training split
            first: dict[str, str] = {}  # the first spelling of each class
            for row in self.rows(self.config.train_split):
                first.setdefault(choice_key(row["answer"]), row["answer"])
            try:
                self._matcher = ChoiceMatcher(list(first.values()))
            except ValueError as err:
                raise ValueError(f"{self.name}: answers of split {self.config.train_split!r}: {err}") from err
            for row in self.rows(self.config.train_split):
                row["answer"] = self._matcher.whole(row["answer"])
        return self._matcher

    @property
    def classes(self) -> list[str]:
        return self.matcher.choices

    def convert(self, record: dict[str, Any], root: Path | None) -> Row:
        gold = gold_answer(record["solution"])
        if self._matcher is not None:  # else the training split is what defines the classes
            named = self._matcher.whole(gold)
            if named is None:
                raise BadRowError(f"answer {gold!r:.80} is not in the class list ({len(self._matcher.by_key)} classes)")
            gold = named
        problem = record.get("problem") or ""
        if not isinstance(problem, str):
            raise BadRowError(f"problem must be a string, got {type(problem).__name__}")
        image, _ = load_image(record["image"], root)
        return {"image": image, "problem": problem, "answer": gold}

    def rows(self, split: str) -> list[Row]:
        if self._matcher is None and split != self.config.train_split:
            self.matcher  # the class list comes from the training split: read it first
        return super().rows(split)

    @classmethod
    def question(cls) -> str:
        return (f"This is an image containing {cls.article} {cls.noun}. "
                f"Please identify the {cls.attribute} of the {cls.noun} based on the image.")

    def prompt(self, row: Row) -> Prompt:
        problem = row["problem"]
        # Deviation: the reference's evaluation also put a literal "<image>\n" before the text.
        # Deviation: a `problem` without the instruction gets it (the reference used it bare).
        text = problem if "<answer>" in problem else f"{problem or self.question()}\n{FORMAT_INSTRUCTION}"
        return image_chat(text)

    def answer(self, completion: str, row: Row, ctx: ScoreContext) -> str | None:
        """The one class of the list that the last <answer> names; None for no tags, no class or several."""
        # Deviation: no <answer> tags scores 0 (the reference then matched the whole completion).
        # Deviation: the last <answer> counts, not the first (as extract_tag does for every task).
        said = extract_tag(completion, "answer")
        # Deviation: one class of the list, not a substring either way ("" and "A or B" scored 1).
        return None if said is None else self.matcher.named(said)

    def score(self, completion: str, row: Row, ctx: ScoreContext) -> dict[str, float]:
        return {"accuracy": float(self.answer(completion, row, ctx) == row["answer"]),
                "format": float(has_think_answer_format(completion))}


@register_task("flower102")
class Flower102Task(ClassificationTask):
    """Oxford 102 Flowers, 4 shots per class (hub: laolao77/ViRFT_CLS_flower_4_shot)."""

    article, noun, attribute = "a", "plant", "species"


@register_task("pets37")
class Pets37Task(ClassificationTask):
    """Oxford-IIIT Pets, 37 breeds, 4 shots per class (hub: laolao77/ViRFT_CLS_pets37_4shot)."""

    article, noun, attribute = "a", "pet", "species"


@register_task("fgvc_aircraft")
class FGVCAircraftTask(ClassificationTask):
    """FGVC-Aircraft, 100 variants, 4 shots per class (hub: laolao77/ViRFT_CLS_fgvc_aircraft_4_shot)."""

    article, noun, attribute = "an", "aircraft", "model"


@register_task("cars196")
class Cars196Task(ClassificationTask):
    """Stanford Cars, 196 models, 4 shots per class (hub: laolao77/ViRFT_CLS_car196_4shot)."""

    article, noun, attribute = "a", "car", "model"
