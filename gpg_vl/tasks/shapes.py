"""shapes: a synthetic task small enough for a random-init tiny model to learn in minutes on CPU.

Rows come from a seed, not from files, and each image is drawn from its row. The answers are
single tokens (a digit or a colour word) because a random-init model learns those fast and
multi-token answers slowly (ENVIRONMENT.md, "Learning from random init").
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

from PIL import Image, ImageDraw

from gpg_vl.rewards import box_iou, parse_box
from gpg_vl.task import Prompt, Row, ScoreContext, Task, TaskConfig, held_out, image_chat, register_task

KINDS = ("count", "colour", "location")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (240, 210, 20)}
SHAPES = ("square", "circle", "triangle")
BACKGROUND = (0, 0, 0)
SPLITS = ("train", "test")
TEST_SHARE = 4  # one distinct image in TEST_SHARE belongs to the test split
QUESTIONS = {
    "count": "How many shapes are in the image?",
    "colour": "What colour is the {shape}?",
    "location": "Where is the {colour} {shape}?",
}
INSTRUCTIONS = {
    "count": " Answer with one digit.",
    "colour": " Answer with one word.",
    "location": " Answer with its box as x1,y1,x2,y2.",
}
DEFAULTS: dict[str, Any] = {
    "kinds": ["count", "colour"], "image_size": 56, "max_shapes": 3,
    "num_train": 4096, "num_test": 256, "seed": 0, "format_weight": 0.0,
}


def _int(name: str, value: Any, low: int, high: float = math.inf) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        bound = f"between {low} and {high}" if high < math.inf else f">= {low}"
        raise ValueError(f"shapes: option {name} must be an integer {bound}, got {value!r}")
    return value


def _grid(max_shapes: int) -> int:
    """Cells per side: one cell per shape so shapes never overlap (one shape fills the image)."""
    return math.ceil(math.sqrt(max_shapes))


@register_task("shapes")
class ShapesTask(Task):
    """Coloured squares, circles and triangles on a plain background, one per cell of a coarse grid.

    Question kinds: "count" (answer "1".."max_shapes"), "colour" (one shape type appears once;
    answer red/green/blue/yellow) and "location" (one colour+shape pair appears once; answer its
    box, scored by IoU after converting the model's box convention to pixels).

    Options (`task.options`):
      kinds: list (or comma-separated string), subset of ["count", "colour", "location"];
        default ["count", "colour"].
      image_size: int, side of the square image in pixels, >= 8 per grid cell; default 56.
      max_shapes: int in 1..9 (a count is one digit); default 3. The grid has
        ceil(sqrt(max_shapes)) cells per side; each shape is a jittered square box of 60-95%
        of its cell.
      num_train, num_test: int >= 1, rows per split; defaults 4096 and 256.
      seed: int; default 0. Train and test rows use different seeds, and every distinct image
        belongs to one split only (by a hash), so no test image is seen in training.
      format_weight: float >= 0, weight of the "format" component in the training reward;
        default 0, so the reward equals accuracy (format is still logged).

    Row fields: id, kind, question, answer (text; a location answer is "x1,y1,x2,y2" in pixels),
    shapes (list of {"shape", "colour", "box": [x1, y1, x2, y2] in pixels}), target (index of
    the asked-about shape, None for count) and image_size ([w, h]).
    """

    reward_components = ("accuracy", "format")
    reward_weights = {"accuracy": 1.0, "format": 0.0}

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        opts = self.options_with_defaults(DEFAULTS)
        kinds = opts["kinds"]
        if isinstance(kinds, str):  # a command-line override: "count,colour"
            kinds = [k.strip() for k in kinds.split(",") if k.strip()]
        if not isinstance(kinds, Sequence) or not kinds \
                or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
            raise ValueError(f"shapes: option kinds must be a non-empty list of distinct names from "
                             f"{list(KINDS)}, got {kinds!r}")
        self.kinds = list(kinds)
        self.max_shapes = _int("max_shapes", opts["max_shapes"], 1, 9)
        self.grid = _grid(self.max_shapes)
        self.image_size = _int("image_size", opts["image_size"], 8 * self.grid)
        self.num = {"train": _int("num_train", opts["num_train"], 1),
                    "test": _int("num_test", opts["num_test"], 1)}
        self.seed = opts["seed"]
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"shapes: option seed must be an integer, got {self.seed!r}")
        fw = opts["format_weight"]
        if isinstance(fw, bool) or not isinstance(fw, (int, float)) or not (0 <= fw < math.inf):
            raise ValueError(f"shapes: option format_weight must be a finite number >= 0, got {fw!r}")
        self.format_weight = float(fw)
        self.cells = self._cell_boxes()
        self._rows: dict[str, list[Row]] = {}

    def weight(self, component: str) -> float:
        # reward_weights is a class attribute; the format weight is an option of this instance.
        return self.format_weight if component == "format" else super().weight(component)

    def answer_set(self, kind: str) -> list[str]:
        """Every well-formed answer of a one-word kind (the format reward's vocabulary)."""
        if kind == "count":
            return [str(n) for n in range(1, self.max_shapes + 1)]
        if kind == "colour":
            return list(COLOURS)
        raise ValueError(f"shapes: kind {kind!r} has no finite answer set")

    # ------------------------------------------------------------ rows

    def _cell_boxes(self) -> list[list[int]]:
        """The pixel box of each grid cell, in reading order."""
        size, n = self.image_size, self.grid
        edges = [round(i * size / n) for i in range(n + 1)]
        return [[x1, y1, x2, y2] for y1, y2 in zip(edges, edges[1:]) for x1, x2 in zip(edges, edges[1:])]

    @staticmethod
    def _place(rng: random.Random, cell: list[int]) -> list[int]:
        """A square box inside a cell: side 60-95% of the cell, anywhere in it. Large shapes,
        because a tiny random-init vision tower learns them far faster than small ones;
        jittered, so that images are many and gold boxes continuous."""
        x1, y1, x2, y2 = cell
        side = min(x2 - x1, y2 - y1)
        s = rng.randint(max(2, round(0.6 * side)), max(2, round(0.95 * side)))
        x, y = x1 + rng.randint(0, (x2 - x1) - s), y1 + rng.randint(0, (y2 - y1) - s)
        return [x, y, x + s, y + s]

    def _candidate(self, rng: random.Random, kind: str) -> tuple[list[dict[str, Any]], int | None]:
        """Random shapes for one row and the index of the asked-about shape (None for count)."""
        k = rng.randint(1, self.max_shapes)
        cells = rng.sample(range(len(self.cells)), k)
        target_shape, target_colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        picks = [(target_shape, target_colour)]
        while len(picks) < k:
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            # The question must name exactly one shape: a colour question asks by shape type,
            # a location question by colour and type.
            if kind == "colour" and shape == target_shape:
                continue
            if kind == "location" and (shape, colour) == (target_shape, target_colour):
                continue
            picks.append((shape, colour))
        shapes = [{"shape": s, "colour": c, "box": self._place(rng, self.cells[cell])}
                  for (s, c), cell in zip(picks, cells)]
        order = sorted(range(k), key=lambda i: cells[i])  # reading order, so the target is not always first
        return [shapes[i] for i in order], (None if kind == "count" else order.index(0))

    def _split_of(self, shapes: list[dict[str, Any]]) -> str:
        key = repr((self.seed, self.image_size, sorted((s["box"], s["shape"], s["colour"]) for s in shapes)))
        return "test" if held_out(key, TEST_SHARE) else "train"

    def _make_row(self, split: str, i: int) -> Row:
        rng = random.Random(f"shapes/{self.seed}/{split}/{i}")  # str seeds hash with sha512: stable across runs
        kind = self.kinds[i % len(self.kinds)]
        for _ in range(10_000):
            shapes, target = self._candidate(rng, kind)
            if self._split_of(shapes) == split:
                break
        else:
            raise ValueError(f"shapes: no {split} image found for kind {kind!r}; raise max_shapes")
        if kind == "count":
            question, answer = QUESTIONS["count"], str(len(shapes))
        elif kind == "colour":
            question, answer = QUESTIONS["colour"].format(shape=shapes[target]["shape"]), shapes[target]["colour"]
        else:
            t = shapes[target]
            question = QUESTIONS["location"].format(colour=t["colour"], shape=t["shape"])
            answer = ",".join(str(v) for v in t["box"])
        return {"id": f"shapes-{split}-{i}", "kind": kind, "question": question, "answer": answer,
                "shapes": shapes, "target": target, "image_size": [self.image_size, self.image_size]}

    def rows(self, split: str) -> list[Row]:
        if split not in SPLITS:
            raise ValueError(f"shapes: unknown split {split!r}; the splits are {', '.join(SPLITS)}")
        if split not in self._rows:
            self._rows[split] = [self._make_row(split, i) for i in range(self.num[split])]
        return self._rows[split]

    # ------------------------------------------------------------ prompt, image, score

    def prompt(self, row: Row) -> Prompt:
        text = row["question"] + INSTRUCTIONS[row["kind"]]
        return image_chat(text)

    def images(self, row: Row) -> list[Image.Image]:
        image = Image.new("RGB", tuple(row["image_size"]), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for s in row["shapes"]:
            x1, y1, x2, y2 = s["box"]
            # A box covers pixels x1..x2-1 (edges between pixels); PIL's coordinates are inclusive.
            r, b = x2 - 1, y2 - 1
            fill = COLOURS[s["colour"]]
            if s["shape"] == "square":
                draw.rectangle([x1, y1, r, b], fill=fill)
            elif s["shape"] == "circle":
                draw.ellipse([x1, y1, r, b], fill=fill)
            else:
                draw.polygon([(x1, b), (r, b), ((x1 + r) / 2, y1)], fill=fill)
        return [image]

    def score(self, completion: str, row: Row, ctx: ScoreContext) -> dict[str, float]:
        if row["kind"] == "location":
            box = parse_box(completion)
            if box is None:
                return {"accuracy": 0.0, "format": 0.0}
            size = tuple(row["image_size"])
            gold = tuple(float(v) for v in row["shapes"][row["target"]]["box"])
            return {"accuracy": box_iou(ctx.boxes.to_pixels(box, size), gold, size), "format": 1.0}
        # Exact equality, not substring or choice matching: "" and "red blue" must score 0.
        said = completion.strip().casefold()
        return {"accuracy": float(said == row["answer"].casefold()), "format": float(said in self.answer_set(row["kind"]))}
