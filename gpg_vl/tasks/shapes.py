"""shapes: a synthetic task small enough for a random-init tiny model to learn in minutes on CPU.

Rows come from a seed, not from files, and each image is drawn from its row. The answers are
single tokens (a digit or a colour word) because a random-init model learns those fast and
multi-token answers slowly.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

from gpg_vl.rewards import box_iou, parse_box
from gpg_vl.settings import check
from gpg_vl.task import GeneratedOptions, GeneratedTask, Prompt, Row, ScoreContext, TaskConfig, held_out, \
    image_chat, register_task

KINDS = ("count", "colour", "location")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (240, 210, 20)}
SHAPES = ("square", "circle", "triangle")
BACKGROUND = (0, 0, 0)
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


@dataclass
class ShapesOptions(GeneratedOptions):
    kinds: list[str] = field(default_factory=lambda: ["count", "colour"])
    """Question kinds, distinct names from count, colour, location."""
    image_size: int = 56
    """Side of the square image in pixels, at least 8 per grid cell."""
    max_shapes: int = 3
    """Most shapes in an image, 1 to 9 (a count is one digit); the grid has ceil(sqrt(max_shapes)) cells per side, each shape a jittered square box of 60-95% of its cell."""

    def __post_init__(self):
        super().__post_init__()
        check(bool(self.kinds) and set(self.kinds) <= set(KINDS) and len(set(self.kinds)) == len(self.kinds),
              f"kinds must be a non-empty list of distinct names from {list(KINDS)}, got {self.kinds!r}")
        check(1 <= self.max_shapes <= 9, f"max_shapes must be an integer between 1 and 9, got {self.max_shapes}")
        check(self.image_size >= 8 * _grid(self.max_shapes),
              f"image_size must be at least {8 * _grid(self.max_shapes)} (8 pixels per grid cell), got {self.image_size}")


def _grid(max_shapes: int) -> int:
    """Cells per side: one cell per shape so shapes never overlap (one shape fills the image)."""
    return math.ceil(math.sqrt(max_shapes))


@register_task("shapes")
class ShapesTask(GeneratedTask):
    """Coloured squares, circles and triangles on a plain background, one per cell of a coarse grid.

    Question kinds: "count" (answer "1".."max_shapes"), "colour" (one shape type appears once;
    answer red/green/blue/yellow) and "location" (one colour+shape pair appears once; answer its
    box, scored by IoU after converting the model's box convention to pixels). The format
    component (weight `format_weight`, default 0) is 1 for any well-formed answer of the kind.

    Row fields: id, kind, question, answer (text; a location answer is "x1,y1,x2,y2" in pixels),
    shapes (list of {"shape", "colour", "box": [x1, y1, x2, y2] in pixels}), target (index of
    the asked-about shape, None for count) and image_size ([w, h]).
    """

    Options = ShapesOptions

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        self.kinds, self.max_shapes = self.options.kinds, self.options.max_shapes
        self.grid, self.image_size, self.seed = _grid(self.max_shapes), self.options.image_size, self.options.seed
        self.cells = self._cell_boxes()

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

    def make_row(self, split: str, i: int) -> Row:
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
