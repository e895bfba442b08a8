"""The paper in miniature: three synthetic vision tasks, one per reward kind of the paper.

- `mini_count`: how many squares (an exact answer, like CV-Bench counting);
- `mini_ground`: which quadrant holds the square, rewarded by the IoU of that quadrant
  with the square's box (a continuous reward, like LISA grounding);
- `mini_classes`: which of ten hue classes fills the image (a class match among many
  classes, like the 4-shot classification sets).

Every answer is one token (a digit): a random-init tiny model learns a one-token answer in
minutes, a multi-token one hardly at all. The image signals are made
plain enough for a 0.18M-parameter model (large shapes aligned with its visual tokens),
and the tasks hard enough for it that early groups are mostly all-wrong, so that the
alpha correction and beta_th resampling have work to do. `scripts/compare.py` trains on them.
"""

from __future__ import annotations

import colorsys
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from gpg_vl.rewards import box_iou
from gpg_vl.task import GeneratedOptions, GeneratedTask, Prompt, Row, ScoreContext, held_out, image_chat, \
    register_task


@dataclass
class MiniatureOptions(GeneratedOptions):
    format_weight: float = 0.5
    """Weight of the "format" component (1 when the completion is one of the task's answer digits); "accuracy" has weight 1."""


class MiniatureTask(GeneratedTask):
    """Rows generated from a seed, one image drawn per row, a one-digit answer.

    Row fields: id, answer (the gold digit), image_size ([w, h]) and the scene's own fields.
    """

    Options = MiniatureOptions
    question = ""
    answers: tuple[str, ...] = ()
    image_size = 56

    def scene(self, rng: random.Random) -> dict[str, Any]:
        """A random scene: the row's fields besides id and image_size, "answer" included."""
        raise NotImplementedError

    def draw(self, row: Row, draw: ImageDraw.ImageDraw) -> None:
        raise NotImplementedError

    def accuracy(self, said: str, row: Row) -> float:
        return float(said == row["answer"])

    def make_row(self, split: str, i: int) -> Row:
        seed = self.options.seed
        rng = random.Random(f"{self.name}/{seed}/{split}/{i}")  # str seeds: stable across runs
        for _ in range(10_000):
            scene = self.scene(rng)
            if held_out(repr((self.name, seed, sorted(scene.items()))), share=4) == (split == "test"):
                break
        else:
            raise ValueError(f"{self.name}: no {split} scene found")
        return {"id": f"{self.name}-{split}-{i}", **scene, "image_size": [self.image_size, self.image_size]}

    def prompt(self, row: Row) -> Prompt:
        return image_chat(self.question)

    def images(self, row: Row) -> list[Image.Image]:
        image = Image.new("RGB", tuple(row["image_size"]), (0, 0, 0))
        self.draw(row, ImageDraw.Draw(image))
        return [image]

    def answer(self, completion: str, row: Row, ctx: ScoreContext) -> str | None:
        """The digit the completion is, alone; None for anything else ("", "3 4", "three")."""
        said = completion.strip()
        return said if said in self.answers else None

    def score(self, completion: str, row: Row, ctx: ScoreContext) -> dict[str, float]:
        said = self.answer(completion, row, ctx)
        if said is None:
            return {"accuracy": 0.0, "format": 0.0}
        return {"accuracy": self.accuracy(said, row), "format": 1.0}


def _square(rng: random.Random, cell: list[float], low: float, high: float) -> list[int]:
    """A square box of side low..high of the cell's side, anywhere inside the cell."""
    x1, y1, x2, y2 = cell
    side = rng.uniform(low, high) * (x2 - x1)
    x, y = rng.uniform(x1, x2 - side), rng.uniform(y1, y2 - side)
    return [round(x), round(y), round(x + side), round(y + side)]


def _fill(draw: ImageDraw.ImageDraw, box: list[int], colour: tuple[int, int, int]) -> None:
    x1, y1, x2, y2 = box
    draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)  # a box covers pixels x1..x2-1


def _cells(size: int, n: int) -> list[list[float]]:
    edges = [i * size / n for i in range(n + 1)]
    return [[x1, y1, x2, y2] for y1, y2 in zip(edges, edges[1:]) for x1, x2 in zip(edges, edges[1:])]


@register_task("mini_count")
class CountTask(MiniatureTask):
    """How many white squares (1-4), one to a quadrant of a 56-pixel image: one quadrant is
    one visual token of the tiny models. Answer: the digit. Accuracy: exact match."""

    question = "How many shapes are in the image? Answer with one digit."
    answers = ("1", "2", "3", "4")

    def scene(self, rng: random.Random) -> dict[str, Any]:
        cells = _cells(self.image_size, 2)
        chosen = sorted(rng.sample(range(4), rng.randint(1, 4)))
        boxes = [_square(rng, cells[c], 0.6, 0.95) for c in chosen]
        return {"boxes": boxes, "answer": str(len(boxes))}

    def draw(self, row: Row, draw: ImageDraw.ImageDraw) -> None:
        for box in row["boxes"]:
            _fill(draw, box, (255, 255, 255))


@register_task("mini_ground")
class GroundTask(MiniatureTask):
    """Where is the white square: answer the digit of a quadrant of a 28-pixel image (1-4 in
    reading order). The square is 35-65% of the image's side and placed anywhere, so it
    usually straddles quadrants. Accuracy: IoU of the named quadrant's box with the square's
    box, in [0, 1]; always naming the best quadrant scores 0.38 on the test split, always
    the same one 0.15-0.18.

    The image is one visual token (with model.min_pixels <= 784): one 14-pixel patch per
    quadrant, concatenated in a fixed order by the patch merger. That order is the only
    absolute position a random-init model can read (rotary positions shape attention, not
    values), so with one token per quadrant the tiny models learn "where" far slower than
    "how many"; a pretrained model brings this sense of position with it."""

    question = "Where is the shape? Answer with one digit."
    answers = ("1", "2", "3", "4")
    metric_label = "mIoU"
    grid = 2
    image_size = 28

    def cells(self) -> list[list[float]]:
        return _cells(self.image_size, self.grid)

    def scene(self, rng: random.Random) -> dict[str, Any]:
        box = _square(rng, [0, 0, self.image_size, self.image_size], 0.35, 0.65)
        best = max(range(len(self.cells())), key=lambda c: box_iou(self.cells()[c], box))
        return {"box": box, "answer": str(best + 1)}

    def draw(self, row: Row, draw: ImageDraw.ImageDraw) -> None:
        _fill(draw, row["box"], (255, 255, 255))

    def accuracy(self, said: str, row: Row) -> float:
        return box_iou(self.cells()[int(said) - 1], row["box"])


HUES = 10


@register_task("mini_classes")
class ClassesTask(MiniatureTask):
    """Which of ten classes: class k is a square of hue 36k degrees (+-3.6), full saturation,
    value 0.85-1 and 80-100% of the image's side, on black. Answer: the class digit 0-9.
    Accuracy: exact match."""

    question = "Which class is this image? Answer with one digit."
    answers = tuple(str(d) for d in range(HUES))

    def scene(self, rng: random.Random) -> dict[str, Any]:
        k = rng.randrange(HUES)
        hue = (k + rng.uniform(-0.1, 0.1)) / HUES
        colour = [round(255 * c) for c in colorsys.hsv_to_rgb(hue % 1.0, 1.0, rng.uniform(0.85, 1.0))]
        box = _square(rng, [0, 0, self.image_size, self.image_size], 0.8, 1.0)
        return {"box": box, "colour": colour, "answer": str(k)}

    def draw(self, row: Row, draw: ImageDraw.ImageDraw) -> None:
        _fill(draw, row["box"], tuple(row["colour"]))
