"""sat and cvbench: multiple-choice spatial reasoning (count, relation, depth, distance).

The paper trains the base Qwen2-VL-2B on SAT (Spatial Aptitude Training, hub `array/SAT`)
and evaluates on CV-Bench (hub `nyu-visionx/CV-Bench`, test split). Both become rows of one
shape, {id, image, question, choices, answer, letter, category}, scored the same way: the
<answer> must name the gold option, by its text or by its letter.
"""

from __future__ import annotations

import json
import random
import re
import string
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageDraw

from gpg_vl.datafiles import BadRowError, ImageRowTask, load_split, open_image
from gpg_vl.rewards import exact_choice, extract_tag, has_think_answer_format
from gpg_vl.task import Prompt, Row, ScoreContext, TaskConfig, image_chat, register_task

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "assets" / "samples"
LETTERS = string.ascii_uppercase
IMAGE_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"  # the processor expands the pad per image
# The paper's base-model prompt (VisualThinker-R1-Zero). A raw string gets no chat template,
# so it carries the image placeholder itself, right where the user's turn begins.
BASE_PROMPT = ("A conversation between User and Assistant. The user asks a question about the image, and the "
               "Assistant solves it. The assistant first thinks about the reasoning process in the mind and then "
               "provides the user with the answer.\nUser: " + IMAGE_TOKENS + "{question} \nAssistant: Let me "
               "solve this step by step.\n<think>")
# The instruct variant asks for the tags in R1-V's words (the paper ran the base prompt only).
INSTRUCT_SUFFIX = " Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
PROMPTS = ("base", "instruct")
_LETTER_ONLY = re.compile(r"\(?([A-Za-z])\)?[.:]?")
_LETTER_TEXT = re.compile(r"\(?([A-Za-z])[).:]\s*+(.+)", re.DOTALL)


def image_ref(value: Any, root: Path | None) -> Any:
    """What a row keeps to re-open its image: a path joined to the image folder, else the value
    itself (hub rows carry the image bytes or a decoded image, not a path)."""
    if isinstance(value, str) and root is not None:
        return str(root / value)
    return value


def checked_choices(choices: Any) -> list[str]:
    if not isinstance(choices, list) or len(choices) < 2 or len(choices) > len(LETTERS) \
            or not all(isinstance(c, str) and c.strip() for c in choices):
        raise BadRowError(f"choices must be a list of 2 to 26 non-empty strings, got {choices!r:.100}")
    choices = [c.strip() for c in choices]
    if any(exact_choice(c, choices) is None for c in choices):  # two options equal up to case and spaces
        raise BadRowError(f"ambiguous choices: two of {choices!r:.100} are the same option")
    return choices


def names_gold(answer: str, row: Row) -> bool:
    """Whether an answer names the gold option: its text ("left"), its letter ("C", "(C)") or
    both ("(C) left"), ignoring case and spaces. "A or B", "" and a wrong pairing name nothing."""
    choices, gold = row["choices"], row["answer"]
    # Deviation: besides the reference's exact option text, a letter and a final period count too.
    said = answer.strip()
    said = said[:-1] if said.endswith(".") else said
    named = exact_choice(said, choices)
    if named is not None:  # a text first, so an option spelled like a letter keeps its meaning
        return named == gold
    letter_only, with_text = _LETTER_ONLY.fullmatch(said), _LETTER_TEXT.fullmatch(said)
    if letter_only:
        return letter_only.group(1).upper() == row["letter"]
    if with_text:
        return with_text.group(1).upper() == row["letter"] and exact_choice(with_text.group(2), choices) == gold
    return False


def sat_converter(seed: int) -> Callable[[dict[str, Any], Path | None], Row | None]:
    """convert() for SAT records; None for a row the reference left out (two images), decided
    before any image is decoded. The row limit is load_rows' max_rows."""

    def convert(record: dict[str, Any], root: Path | None) -> Row | None:
        images = record["image_bytes"]
        if not isinstance(images, list) or not images:
            raise BadRowError(f"image_bytes must be a non-empty list of images, got {images!r:.80}")
        if len(images) != 1:
            return None
        question = record["question"]
        if not isinstance(question, str) or not question.strip():
            raise BadRowError("empty question")
        choices = checked_choices(record["answers"])
        gold = exact_choice(str(record["correct_answer"]), choices)
        if gold is None:
            raise BadRowError(f"correct_answer {record['correct_answer']!r:.60} is not one of the "
                              f"answers {choices!r:.100}")
        open_image(images[0], root)
        # The reference shuffled the options once (SAT lists the right one first); seeded by the
        # row's content, so the order is the same in every run and on every process.
        random.Random(repr((seed, question, choices))).shuffle(choices)
        listed = ", ".join(choices[:-1]) + " or " + choices[-1]  # "a, b or c", as TASKS.md gives it
        return {"image": image_ref(images[0], root), "category": str(record.get("question_type") or ""),
                "question": f"Answer in natural language. {question.strip()} Choose between the following "
                            f"options: {listed}", "choices": choices, "answer": gold,
                "letter": LETTERS[choices.index(gold)]}

    return convert


def cvbench_convert(record: dict[str, Any], root: Path | None) -> Row:
    """A CV-Bench record (fields idx, type, task, image or filename, question, choices, answer
    "(C)", prompt) -> a row; the benchmark's own `prompt` is the question shown."""
    image = record["filename"] if record.get("image") is None else record["image"]
    choices = checked_choices(record["choices"])
    m = re.fullmatch(r"\(([A-Z])\)", str(record["answer"]).strip())
    if m is None or LETTERS.index(m.group(1)) >= len(choices):
        raise BadRowError(f"answer must be a letter of the {len(choices)} choices like \"(A)\", "
                          f"got {record['answer']!r:.40}")
    category = record["task"]
    if not isinstance(category, str) or not category.strip():
        raise BadRowError("task (the category: Count, Relation, Depth or Distance) is empty")
    question = record.get("prompt") or (str(record["question"]).strip() + " Select from the following choices.\n"
                                        + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices)))
    open_image(image, root)
    letter = m.group(1)
    return {"image": image_ref(image, root), "category": category.strip(), "question": question,
            "choices": choices, "answer": choices[LETTERS.index(letter)], "letter": letter}


class ChoiceTask(ImageRowTask):
    """Shared prompt, images and score of sat and cvbench (see their docstrings)."""

    reward_components = ("accuracy", "format")
    metric_group = "category"  # CV-Bench reports Count, Relation, Depth, Distance and their total
    defaults: dict[str, Any] = {"prompt": "base"}

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        self.options = self.options_with_defaults(self.defaults)
        if self.options["prompt"] not in PROMPTS:
            raise ValueError(f"{self.name}: option prompt must be base or instruct, got {self.options['prompt']!r}")
        self._rows: dict[str, list[Row]] = {}

    def read(self, data_path: str, split: str, convert: Callable, max_rows: int = 0) -> list[Row]:
        rows = load_split(self, data_path, split, convert, max_rows)
        return [{"id": f"{self.name}-{split}-{i}", **r} for i, r in enumerate(rows)]

    def prompt(self, row: Row) -> Prompt:
        if self.options["prompt"] == "base":
            return BASE_PROMPT.format(question=row["question"])
        text = row["question"] + INSTRUCT_SUFFIX
        return image_chat(text)

    def _full_text(self, completion: str) -> str:
        # The base prompt ends in "<think>", so the model's text continues inside it.
        return "<think>" + completion if self.options["prompt"] == "base" else completion

    def answer(self, completion: str, row: Row, ctx: ScoreContext) -> str | None:
        """The content of the last <answer>...</answer>."""
        return extract_tag(self._full_text(completion), "answer")

    def score(self, completion: str, row: Row, ctx: ScoreContext) -> dict[str, float]:
        answer = self.answer(completion, row, ctx)
        return {"accuracy": float(answer is not None and names_gold(answer, row)),
                "format": float(has_think_answer_format(self._full_text(completion)))}


@register_task("sat")
class SatTask(ChoiceTask):
    """Train on SAT: single-image rows with shuffled options, the gold being the option text.

    Data (`task.data_path`, default the bundled sample; the paper: `array/SAT`): SAT's fields
    `image_bytes` (a list of images: paths, {"bytes"} dicts or hub images; rows with two images
    are left out, as the reference did), `question`, `answers` (the options), `correct_answer`
    (one of them) and `question_type` (kept as the row's category). Bad rows: a missing field,
    a missing or unreadable image, fewer than 2 or duplicate options, a gold not among them.

    Reward: accuracy 1 when the <answer> names the gold option by its text or its letter (in the
    order listed), else 0; format 1 for <think>...</think> <answer>...</answer>.

    Options (`task.options`):
      prompt: "base" (default; the paper's plain-text prompt for the base model, which opens
        <think>, so the format is checked on "<think>" + completion) or "instruct" (a chat turn
        asking for the think/answer tags).
      max_train_rows: int >= 0, the first this many single-image rows of the training split
        (default 15000, as the paper; 0 = all).
      seed: int, seed of the option shuffle (default 0).
      cvbench_path: "" (default) or a CV-Bench data path (`nyu-visionx/CV-Bench` or a local
        folder): the evaluation split is then read from CV-Bench, as the paper evaluates.
    """

    defaults = {"prompt": "base", "max_train_rows": 15000, "seed": 0, "cvbench_path": ""}

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        for name, low in (("max_train_rows", 0), ("seed", None)):
            value = self.options[name]
            if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
                bound = "" if low is None else f" >= {low}"
                raise ValueError(f"sat: option {name} must be an integer{bound}, got {value!r}")
        path = self.options["cvbench_path"]
        if not isinstance(path, str):
            raise ValueError(f"sat: option cvbench_path must be a path or hub name, got {path!r}")

    def rows(self, split: str) -> list[Row]:
        if split not in self._rows:
            c, o = self.config, self.options
            if o["cvbench_path"] and split == c.eval_split:
                self._rows[split] = self.read(o["cvbench_path"], split, cvbench_convert)
            else:
                limit = o["max_train_rows"] if split == c.train_split else 0
                convert = sat_converter(o["seed"])
                self._rows[split] = self.read(c.data_path or str(SAMPLES / "sat"), split, convert, limit)
        return self._rows[split]

    @classmethod
    def make_samples(cls, folder: Path, train: int = 12, test: int = 8) -> None:
        """SAT-format jsonl (image_bytes as paths) with scenes whose answers are true; the first
        training row has two images, as SAT's motion questions do, and is left out on loading."""
        write_samples(folder, {"train": train, "test": test}, sat_record)


@register_task("cvbench")
class CvBenchTask(ChoiceTask):
    """CV-Bench (evaluation only; hub `nyu-visionx/CV-Bench`, split test, 2638 rows).

    Fields as the public CV-Bench uses them: `image` (or `filename`, a path like
    img/2D/count/x.png), `question`, `choices`, `answer` ("(C)"), `task` (the category: Count,
    Relation, Depth, Distance; kept as the row's `category` for a per-category report),
    `prompt` (the question with lettered choices; built from question and choices if absent).

    Reward: accuracy 1 when the <answer> names the gold option by its letter or its text;
    format as for sat.

    Options: prompt: "base" (default, as sat trains) or "instruct".
    """

    def rows(self, split: str) -> list[Row]:
        if split not in self._rows:
            self._rows[split] = self.read(self.config.data_path or str(SAMPLES / "cvbench"), split, cvbench_convert)
        return self._rows[split]

    @classmethod
    def make_samples(cls, folder: Path, test: int = 12) -> None:
        """CV-Bench-format test.jsonl (images under img/) with scenes whose answers are true."""
        write_samples(folder, {"test": test}, cvbench_record)


# ---------------------------------------------------------------- generated samples

COLOURS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210)}


def scene(rng: random.Random, least: int = 1) -> tuple[Image.Image, list[tuple[str, int, int]]]:
    """A 64x64 image with `least`-3 squares of distinct colours: (colour, centre x, size) each."""
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    found = []
    for j, colour in enumerate(rng.sample(list(COLOURS), rng.randint(least, 3))):
        side, cx = rng.randint(6, 14), 11 + 21 * j
        top = rng.randint(2, 62 - side)
        draw.rectangle([cx - side // 2, top, cx + side // 2, top + side], fill=COLOURS[colour])
        found.append((colour, cx, side))
    return image, found


def sat_record(rng: random.Random, name: str, index: int) -> tuple[dict[str, Any], list[Image.Image]]:
    image, found = scene(rng)
    if len(found) == 1:
        question, answers = "How many squares are there?", ["1", "2", "3"]
    else:
        a, b = rng.sample(found, 2)
        question, answers = f"Is the {a[0]} square to the left or right of the {b[0]} square?", ["left", "right"]
        answers = answers if a[1] < b[1] else answers[::-1]
    images = [image] if index else [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return ({"image_bytes": [f"images/{name}_{k}.png" for k in range(len(images))], "question": question,
             "answers": answers, "correct_answer": answers[0],
             "question_type": "count" if len(found) == 1 else "relation"}, images)


def cvbench_record(rng: random.Random, name: str, index: int) -> tuple[dict[str, Any], list[Image.Image]]:
    task = ("Count", "Relation", "Depth", "Distance")[index % 4]
    image, found = scene(rng, 1 if task == "Count" else 2)
    if task == "Count":
        question, choices, gold = "How many squares are in the image?", ["3", "2", "1", "0"], str(len(found))
    else:
        a, b = rng.sample(found, 2)
        if task == "Relation":
            question = f"Where is the {a[0]} square located with respect to the {b[0]} square?"
            choices = ["left", "right"]
            gold = "left" if a[1] < b[1] else "right"
        else:  # Depth and Distance alike: the larger square stands nearer the camera
            question, choices = f"Which square is closer to the camera, the {a[0]} or the {b[0]}?", [a[0], b[0]]
            gold = a[0] if a[2] >= b[2] else b[0]
    lettered = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    filename = f"img/{'2D' if task in ('Count', 'Relation') else '3D'}/{task.lower()}/{name}.png"
    return ({"idx": index, "type": filename.split("/")[1], "task": task, "filename": filename,
             "question": question, "choices": choices, "answer": f"({LETTERS[choices.index(gold)]})",
             "prompt": f"{question} Select from the following choices.\n{lettered}"}, [image])


def write_samples(folder: Path, sizes: dict[str, int], make: Callable) -> None:
    for split, n in sizes.items():
        rng = random.Random(f"{make.__name__}/{split}")  # the same sample wherever it is written
        lines = []
        for i in range(n):
            record, images = make(rng, f"{split}_{i:02d}", i)
            paths = record.get("image_bytes") or [record["filename"]]
            for path, image in zip(paths, images):
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                image.save(folder / path)
            lines.append(json.dumps(record))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
