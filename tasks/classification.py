"""flower102, pets37, fgvc_aircraft, cars196: 4-shot fine-grained image classification.

The Visual-RFT data (TASKS.md): one image per row, `problem` (the prompt), `solution` =
"<answer>class name</answer>". The reward closes the exploits of the reference's substring
match (Visual-RFT issues 79 and 176) by matching the answer against the task's class list:
the answer must name exactly one class, and that class must be the gold one.
"""

from __future__ import annotations

import colorsys
import json
import random
import re
import unicodedata
from pathlib import Path
from typing import Any, ClassVar, Sequence

from PIL import Image, ImageDraw

from gpg_vl.datafiles import BadRowError, ImageRowTask, load_split, open_image
from gpg_vl.rewards import extract_tag, has_think_answer_format
from gpg_vl.task import Prompt, Row, ScoreContext, TaskConfig, image_chat, register_task

REPO = Path(__file__).resolve().parent.parent
CLASSES_FILE = "classes.txt"
OPTIONS = ("classes_file",)
# The reference's instruction, verbatim (its missing space after "tags." and its "species
# name" on every data set included), so that prompts tokenize as in the paper's runs.
FORMAT_INSTRUCTION = ("Output the thinking process in <think> </think> and final answer in <answer> </answer> "
                      "tags.The output answer format should be as follows:\n<think> ... </think> "
                      "<answer>species name</answer>\nPlease strictly follow the format.")
# Deviation: hyphens are dropped like spaces and underscores ("desert rose" is "desert-rose").
_SEPARATOR = r"[\s_\-]"  # between the words of a class name: "desert-rose", "desert rose", "desertrose"
_DROP = re.compile(r"[\s_\-]+")
_LETTER_OR_DIGIT = r"[^\W_]"  # a class name must not continue a word ("rose" in "primrose")


def folded(text: str) -> str:
    """Text as names are compared: NFKC (full-width letters are letters) and case-folded."""
    return unicodedata.normalize("NFKC", text).casefold()


def class_key(name: str) -> str:
    """A name as the reward compares it: folded, without spaces, underscores or hyphens."""
    return _DROP.sub("", folded(name))


def read_class_list(path: Path) -> list[str]:
    """Class names from a .txt file (one per line, the reference's format) or a .json list."""
    if not path.is_file():
        raise FileNotFoundError(f"class list not found: {path}")
    if path.suffix == ".json":
        names = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path} must hold a JSON list of class names")
    else:
        names = path.read_text(encoding="utf-8").splitlines()
    return checked_class_list([n.strip() for n in names if n.strip()], str(path))


def checked_class_list(names: Sequence[str], source: str) -> list[str]:
    """The names, refused when empty or when two of them compare equal (the reward could not
    tell which one an answer names)."""
    seen: dict[str, str] = {}
    for name in names:
        key = class_key(name)
        if not key:
            raise ValueError(f"{source}: class name {name!r} is empty once spaces and punctuation are dropped")
        if key in seen:
            raise ValueError(f"{source}: class names {seen[key]!r} and {name!r} are the same once case, "
                             f"spaces, underscores and hyphens are ignored")
        seen[key] = name
    if not seen:
        raise ValueError(f"{source}: the class list is empty")
    return list(seen.values())


class ClassMatcher:
    """Which class an answer names: the whole answer is one class name, or exactly one class
    name occurs in it as whole words ("It is a pink primrose." names "pink primrose")."""

    def __init__(self, classes: Sequence[str]):
        self.by_key = {class_key(c): c for c in classes}
        # Longest first: at one position the alternation takes the first that matches, so
        # "desert-rose" wins over "rose", and a name nested in a longer one is not counted.
        words = [[w for w in _DROP.split(folded(c)) if w] for c in classes]
        alternatives = sorted((f"{_SEPARATOR}*+".join(map(re.escape, w)) for w in words), key=len, reverse=True)
        self.pattern = re.compile(f"(?<!{_LETTER_OR_DIGIT})(?:{'|'.join(alternatives)})(?!{_LETTER_OR_DIGIT})")

    def named(self, answer: str) -> str | None:
        """The one class the answer names, else None (no class, or several: "A or B", "A, B")."""
        whole = self.by_key.get(class_key(answer))
        if whole is not None:
            return whole
        found = {class_key(m.group()) for m in self.pattern.finditer(folded(answer))}
        return self.by_key.get(found.pop()) if len(found) == 1 else None


def gold_answer(solution: Any) -> str:
    """The class name of a `solution`: "<answer>name</answer>" or the bare name."""
    if not isinstance(solution, str):
        raise BadRowError(f"solution must be a string, got {type(solution).__name__}")
    tagged = extract_tag(solution, "answer")
    gold = solution.strip() if tagged is None else tagged
    if not class_key(gold):
        raise BadRowError(f"empty answer in solution {solution!r:.80}")
    return gold


def image_ref(value: Any, root: Path | None) -> Any:
    """What a row keeps of its image: the file path, or the encoded bytes / decoded image of
    rows that carry the image itself (hub and parquet rows)."""
    if isinstance(value, dict) and value.get("bytes"):
        return {"bytes": value["bytes"]}
    rel = value.get("path") if isinstance(value, dict) else value
    if isinstance(rel, str):
        return str(Path(rel) if root is None else root / rel)
    return value


def sample_image(index: int, count: int, rng: random.Random) -> Image.Image:
    """A 64-pixel picture of class `index` of `count`: a blob of the class's hue on 1-3 stripes
    of its own (two cues a tiny model can learn), placed at random so no two are alike."""
    size = 64
    colour = tuple(round(255 * v) for v in colorsys.hsv_to_rgb(index / count, 0.85, 0.95))
    image = Image.new("RGB", (size, size), (24, 24, 24))
    draw = ImageDraw.Draw(image)
    stripes = index % 3 + 1
    for k in range(stripes):
        y = (k + 1) * size // (stripes + 1)
        draw.rectangle([0, y - 2, size - 1, y + 1], fill=tuple(c // 2 for c in colour))
    r = rng.randint(12, 20)
    x, y = rng.randint(r, size - 1 - r), rng.randint(r, size - 1 - r)
    draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return image


class ClassificationTask(ImageRowTask):
    """Name the class of the object in one image (Visual-RFT's 4-shot fine-grained sets).

    Data (`task.data_path`): the hub set of the task, or a local folder with `train.jsonl` and
    `test.jsonl` (or .json / .parquet) whose rows hold
      image: path relative to the data folder (or `task.image_root`), or {"bytes": ...} as in
        the hub's parquet files;
      solution: "<answer>class name</answer>" or the bare class name;
      problem (optional): the prompt text. When it holds the think/answer instruction it is
        the prompt as written (the reference's training prompt); otherwise the instruction
        is appended to it, or to the reference's question when there is no `problem`.
    and, optionally, `classes.txt` (one class name per line, as the reference's
    category files) beside them. Default: the bundled sample, assets/samples/<task>/.

    Options (`task.options`):
      classes_file: path of the class list (.txt, one name per line, or a .json list);
        default `classes.txt` in the data folder, else the distinct answers of the training
        split (a 4-shot training set holds every class). A row whose answer is not in the
        list is a bad row (`task.on_bad_row`).

    Reward: accuracy 1 iff the last <answer>...</answer> names exactly one class of the list
    and it is the gold one; names compare ignoring case, spaces, underscores and hyphens.
    "Names" means the whole answer is the class ("Pink_Primrose") or the class occurs in it as
    whole words ("It is a pink primrose."); a name inside a longer one does not count ("rose"
    in "desert-rose"). Format 1 iff the completion is <think>...</think> <answer>...</answer>.
    """

    reward_components = ("accuracy", "format")
    article: ClassVar[str] = "an"
    noun: ClassVar[str] = "object"
    attribute: ClassVar[str] = "class"
    sample_classes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        self.options_with_defaults(dict.fromkeys(OPTIONS))
        self.data_path = config.data_path or str(REPO / "assets" / "samples" / self.name)
        self._matcher: ClassMatcher | None = None
        self._rows: dict[str, list[Row]] = {}
        given = config.options.get("classes_file", "")
        if not isinstance(given, str):
            raise ValueError(f"{self.name}: option classes_file must be a path, got {given!r}")
        path = Path(given).expanduser() if given else self._default_class_file()
        if path is not None:
            self._matcher = ClassMatcher(read_class_list(path))

    def _default_class_file(self) -> Path | None:
        local = Path(self.data_path).expanduser()
        if not local.exists():
            return None
        path = (local if local.is_dir() else local.parent) / CLASSES_FILE
        return path if path.is_file() else None

    @property
    def classes(self) -> list[str]:
        return list(self.matcher.by_key.values())

    @property
    def matcher(self) -> ClassMatcher:
        if self._matcher is None:
            self._derive_classes()
        return self._matcher

    def _derive_classes(self) -> None:
        """No class list given: take the distinct answers of the training split."""
        split = self.config.train_split
        rows = self._load(split)  # answers as written: there is no list to check them against yet
        first: dict[str, str] = {}
        for row in rows:
            first.setdefault(class_key(row["answer"]), row["answer"])
        self._matcher = ClassMatcher(checked_class_list(list(first.values()), f"answers of split {split!r}"))
        for row in rows:
            row["answer"] = self._matcher.by_key[class_key(row["answer"])]
        self._rows[split] = rows

    # ------------------------------------------------------------ rows

    def _convert(self, record: dict[str, Any], root: Path | None) -> Row:
        gold = gold_answer(record["solution"])
        if self._matcher is not None:
            named = self._matcher.by_key.get(class_key(gold))
            if named is None:
                raise BadRowError(f"answer {gold!r} is not in the class list ({len(self._matcher.by_key)} classes)")
            gold = named
        problem = record.get("problem") or ""
        if not isinstance(problem, str):
            raise BadRowError(f"problem must be a string, got {type(problem).__name__}")
        open_image(record["image"], root)  # a missing or corrupt image is a bad row now, not mid-training
        return {"image": image_ref(record["image"], root), "problem": problem, "answer": gold}

    def _load(self, split: str) -> list[Row]:
        return load_split(self, self.data_path, split, self._convert)

    def rows(self, split: str) -> list[Row]:
        if self._matcher is None:
            self._derive_classes()  # which also loads the training split
        if split not in self._rows:
            self._rows[split] = self._load(split)
        return self._rows[split]

    # ------------------------------------------------------------ prompt, image, score

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

    # ------------------------------------------------------------ bundled sample

    @classmethod
    def make_samples(cls, folder: Path) -> None:
        """Write the offline sample: 2 training and 1 test image per sample class."""
        folder = Path(folder)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / CLASSES_FILE).write_text("\n".join(cls.sample_classes) + "\n", encoding="utf-8")
        problem = f"{cls.question()}\n{FORMAT_INSTRUCTION}"
        n = len(cls.sample_classes)
        for split, shots in (("train", 2), ("test", 1)):
            lines = []
            for i in range(shots * n):
                path = f"images/{split}_{i:02d}.png"
                sample_image(i % n, n, random.Random(f"{cls.name}/{split}/{i}")).save(folder / path, optimize=True)
                row = {"image": path, "problem": problem, "solution": f"<answer>{cls.sample_classes[i % n]}</answer>"}
                lines.append(json.dumps(row))
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


@register_task("flower102")
class Flower102Task(ClassificationTask):
    """Oxford 102 Flowers, 4 shots per class (hub: laolao77/ViRFT_CLS_flower_4_shot)."""

    article, noun, attribute = "a", "plant", "species"
    sample_classes = ("pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea",
                      "english marigold", "tiger lily", "rose", "desert-rose")


@register_task("pets37")
class Pets37Task(ClassificationTask):
    """Oxford-IIIT Pets, 37 breeds, 4 shots per class (hub: laolao77/ViRFT_CLS_pets37_4shot)."""

    article, noun, attribute = "a", "pet", "species"
    sample_classes = ("abyssinian", "american bulldog", "american pit bull terrier", "basset hound",
                      "beagle", "bengal", "birman", "staffordshire bull terrier")


@register_task("fgvc_aircraft")
class FGVCAircraftTask(ClassificationTask):
    """FGVC-Aircraft, 100 variants, 4 shots per class (hub: laolao77/ViRFT_CLS_fgvc_aircraft_4_shot)."""

    article, noun, attribute = "an", "aircraft", "model"
    sample_classes = ("707-320", "727-200", "737-200", "737-300", "747-100", "747-200", "A320", "A321")


@register_task("cars196")
class Cars196Task(ClassificationTask):
    """Stanford Cars, 196 models, 4 shots per class (hub: laolao77/ViRFT_CLS_car196_4shot)."""

    article, noun, attribute = "a", "car", "model"
    sample_classes = ("AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012",
                      "Acura TL Type-S 2008", "Acura TSX Sedan 2012", "Acura Integra Type R 2001",
                      "Acura ZDX Hatchback 2012", "Aston Martin V8 Vantage Convertible 2012")
