"""lisa: reasoning grounding on ReasonSeg (LISA). Given an image and an implicit instruction
("the thing you would sit on"), think, then answer the box of the object meant.

Two on-disk forms of the same data:
- processed rows, as the reference wrote them: `{image_path, instruction, boxes}` in a
  .json/.jsonl/.parquet file (or a folder of <split>.<ext>), boxes in original-image pixels;
- the raw ReasonSeg release: a folder `<data_path>/<split>/` of images, each with a same-name
  .json holding `text` (a list of instructions) and `shapes` (labelme polygons).
"""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from gpg_vl.datafiles import ROW_ERRORS, SUFFIXES, BadRowError, ImageRowTask, LoadReport, load_split, open_image, \
    pixel_cap
from gpg_vl.eval_metrics import MASK_IGNORE
from gpg_vl.rewards import box_giou, box_iou, extract_tag, has_think_answer_format, parse_box
from gpg_vl.task import Prompt, Row, ScoreContext, TaskConfig, image_chat, register_task

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "assets" / "samples" / "lisa"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
BORDER_SLACK = 1.0  # px: annotation tools round polygon points to just outside the image
PROMPT = ("Output the bounding box in the image corresponding to the instruction: {instruction}\n"
          "Think first inside <think> </think> tags, then give the box inside <answer> </answer> tags, "
          "as \"<think> reasoning </think> <answer>(x1,y1),(x2,y2)</answer>\".")

# Sample scenes: flat polygons on grey, named by colour in the instructions.
COLOURS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210), "yellow": (230, 200, 30)}
SAMPLE_SIZE = (100, 75)  # not multiples of 28: Qwen2.5-VL's resize changes them (boxes must follow)


def image_ref(value: Any, root: Path | None) -> Any:
    """What a row keeps to re-open its image: a path joined to the image folder, else the value
    itself (hub rows carry the image bytes or a decoded image, not a path)."""
    if isinstance(value, str) and root is not None:
        return str(root / value)
    return value


def checked_box(value: Any, size: tuple[int, int]) -> list[float]:
    """[x1, y1, x2, y2] in pixels inside the image; a list of boxes gives its first one."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
        value = value[0]
    if not isinstance(value, (list, tuple)) or len(value) != 4 \
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise BadRowError(f"box must be four finite numbers [x1, y1, x2, y2], got {value!r:.80}")
    x1, y1, x2, y2 = (float(v) for v in value)
    w, h = size
    if min(x1, y1) < -BORDER_SLACK or x2 > w + BORDER_SLACK or y2 > h + BORDER_SLACK:
        raise BadRowError(f"box {[x1, y1, x2, y2]} lies outside the {w}x{h} image")
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
    if x2 <= x1 or y2 <= y1:
        raise BadRowError(f"box {list(value)} is inverted or empty (need x1 < x2 and y1 < y2)")
    return [x1, y1, x2, y2]


def convert(record: dict[str, Any], root: Path | None) -> Row:
    """A processed record -> a row with all its instructions (flattened by the caller)."""
    image = record.get("image_path", record.get("image"))
    if image is None:
        raise KeyError("image_path")
    instructions = record["instruction"]
    if isinstance(instructions, str):
        instructions = [instructions]
    if not isinstance(instructions, list) or not all(isinstance(s, str) for s in instructions):
        raise BadRowError(f"instruction must be a string or a list of strings, got {instructions!r:.80}")
    instructions = [s.strip() for s in instructions if s.strip()]
    if not instructions:
        raise BadRowError("empty instruction")
    size = open_image(image, root).size
    box = checked_box(record["boxes"], size)
    return {"image": image_ref(image, root), "image_size": list(size), "instructions": instructions, "box": box,
            "shapes": record.get("shapes")}


def polygon_points(shape: Any) -> list[tuple[float, float]]:
    """The [x, y] points of a labelme polygon, at least 3."""
    try:
        points = [(float(p[0]), float(p[1])) for p in shape["points"]]
    except (TypeError, ValueError, IndexError, KeyError) as err:
        raise BadRowError(f"polygon points must be [x, y] pairs ({err})") from err
    if len(points) < 3:
        raise BadRowError(f"a polygon needs at least 3 points, got {len(points)}")
    return points


def _ignored(shape: dict[str, Any]) -> bool:
    """A region ReasonSeg marks to leave out; labels are compared as LISA's loader does
    ("ignore" anywhere in the label, any case)."""
    return "ignore" in str(shape.get("label", "")).lower()


def _flag(shape: dict[str, Any]) -> bool:
    return str(shape.get("label", "")).lower() == "flag"


def polygon_box(shapes: Any) -> list[float]:
    """The pixel box (min x, min y, max x, max y) of the first target polygon."""
    if not isinstance(shapes, list):
        raise BadRowError("shapes must be a list of polygons")
    # Deviation: ReasonSeg labels regions to leave out "ignore"; those are skipped, not taken as the target.
    targets = [s for s in shapes if isinstance(s, dict) and not _ignored(s)]
    if not targets:
        raise BadRowError("no target polygon in shapes")
    xs, ys = zip(*polygon_points(targets[0]))
    return [min(xs), min(ys), max(xs), max(ys)]


def polygon_mask(shapes: list[dict[str, Any]], size: tuple[int, int]) -> np.ndarray:
    """The gold mask [H, W] of ReasonSeg polygons, drawn as LISA's evaluation draws it: largest
    polygon first, "ignore" polygons as MASK_IGNORE, every other one (but "flag") as 1."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)

    def area(shape: dict[str, Any]) -> float:
        xy = polygon_points(shape)
        return abs(sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(xy, xy[1:] + xy[:1]))) / 2

    for shape in sorted((s for s in shapes if not _flag(s)), key=area, reverse=True):
        draw.polygon(polygon_points(shape), fill=MASK_IGNORE if _ignored(shape) else 1)
    return np.asarray(mask, dtype=np.uint8)


def reasonseg_record(annotation: Path) -> dict[str, Any]:
    """The processed record of one raw ReasonSeg image: its annotation json and same-name image."""
    images = [annotation.with_suffix(s) for s in IMAGE_SUFFIXES if annotation.with_suffix(s).is_file()]
    if not images:
        raise BadRowError(f"no image {annotation.stem}{{{','.join(IMAGE_SUFFIXES)}}} next to the annotation")
    try:
        data = json.loads(annotation.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRowError(f"annotation is not JSON ({err})") from err
    if not isinstance(data, dict):
        raise BadRowError("annotation must be a JSON object with text and shapes")
    return {"image_path": images[0].name, "instruction": data["text"], "boxes": polygon_box(data["shapes"]),
            "shapes": data["shapes"]}


def load_reasonseg(folder: Path, on_bad_row: str, max_pixels: int) -> tuple[list[Row], LoadReport]:
    """Rows of a raw ReasonSeg split folder, bad images named (error) or counted (skip)."""
    report, rows = LoadReport(str(folder)), []
    for annotation in sorted(folder.glob("*.json")):
        report.read += 1
        try:
            with pixel_cap(max_pixels):
                rows.append(convert(reasonseg_record(annotation), folder))
        except ROW_ERRORS as err:
            reason = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            if on_bad_row != "skip":
                raise BadRowError(f"{annotation}: {reason} (set task.on_bad_row=skip to drop such rows)") from err
            report.skipped += 1
            report.examples = (report.examples + [f"{annotation.name}: {reason}"])[:3]
    report.kept = len(rows)
    if not rows:
        raise BadRowError(f"{folder}: no usable images ({report})")
    if report.skipped:
        warnings.warn(str(report), stacklevel=2)
    return rows, report


@register_task("lisa")
class LisaTask(ImageRowTask):
    """Reasoning grounding (ReasonSeg / LISA): one training sample per instruction.

    Data (`task.data_path`, default the bundled sample): processed rows with fields
    `image_path` (or `image`), `instruction` (a string, or a list: one row each) and `boxes`
    ([x1, y1, x2, y2] or a list of boxes, first used; original-image pixels); or the raw
    ReasonSeg layout `<data_path>/<split>/*.json` + same-name images (task.image_root unused),
    box = the first polygon not labelled "ignore". The raw layout's polygons (or a `shapes`
    field of processed rows, labelme polygons) also give the gold mask for gIoU/cIoU.
    Bad rows: missing field, missing or unreadable image, box outside the image (more than
    1 px: nearer is clipped) or with x2 <= x1 or y2 <= y1.

    Reward components:
      accuracy: GIoU + 1 in [0, 2] of the first box in the last <answer> against the gold box,
        the model's box converted to original pixels by its adapter's convention (Qwen2-VL's
        0-1000 grid or Qwen2.5-VL's resized pixels); 0 when no box parses inside the tags.
      format: 1 when the completion is <think>...</think> <answer>...</answer>.
      iou: plain IoU of the same box (weight 0: logged only; its evaluation mean is the
        paper's mIoU).

    Options: none.
    """

    reward_components = ("accuracy", "format", "iou")
    reward_weights = {"iou": 0.0}
    metric_component, metric_label = "iou", "mIoU"

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        self.options_with_defaults({})  # lisa takes no options
        self.data_path = config.data_path or str(SAMPLE)
        self._rows: dict[str, list[Row]] = {}

    def rows(self, split: str) -> list[Row]:
        if split not in self._rows:
            c = self.config
            raw = Path(self.data_path).expanduser() / split
            if raw.is_dir() and not any((raw.parent / f"{split}{s}").is_file() for s in SUFFIXES):
                images, self.load_reports[split] = load_reasonseg(raw, c.on_bad_row, c.max_image_pixels)
            else:
                images = load_split(self, self.data_path, split, convert)
            self._rows[split] = [
                {"id": f"lisa-{split}-{i}-{k}", "image": g["image"], "image_size": g["image_size"],
                 "instruction": text, "box": g["box"], "shapes": g["shapes"]}
                for i, g in enumerate(images) for k, text in enumerate(g["instructions"])]
        return self._rows[split]

    def prompt(self, row: Row) -> Prompt:
        text = PROMPT.format(instruction=row["instruction"])
        return image_chat(text)

    def answer(self, completion: str, row: Row, ctx: ScoreContext) -> list[float] | None:
        """The first box of the last <answer>, converted to pixels of the original image by the
        model's box convention; None when no box parses inside the tags."""
        # Deviation: the last complete <answer> is read (the reference's regex took the first one).
        answer = extract_tag(completion, "answer")
        box = parse_box(answer) if answer is not None else None
        return None if box is None else list(ctx.boxes.to_pixels(box, _size(row)))

    def score(self, completion: str, row: Row, ctx: ScoreContext) -> dict[str, float]:
        fmt = float(has_think_answer_format(completion))
        # Deviation: no 2.0 for an exact string match and no symbolic check (reference artefacts).
        pred = self.answer(completion, row, ctx)
        if pred is None:
            return {"accuracy": 0.0, "format": fmt, "iou": 0.0}
        size, gold = _size(row), tuple(row["box"])
        # Clipped to the image (box_giou's image_size): a box spilling past the border loses
        # nothing for the part no object can occupy.
        return {"accuracy": box_giou(tuple(pred), gold, size) + 1.0, "format": fmt,
                "iou": box_iou(tuple(pred), gold, size)}

    def gold_mask(self, row: Row) -> np.ndarray | None:
        """The object mask of a raw ReasonSeg row (its polygons); None for processed rows."""
        return None if row.get("shapes") is None else polygon_mask(row["shapes"], _size(row))

    @classmethod
    def make_samples(cls, folder: Path, train: int = 10, test: int = 8) -> None:
        """Generated scenes in both layouts: processed rows (<split>.jsonl + images/) and the
        raw ReasonSeg form (reasonseg/<split>/NAME.jpg + NAME.json)."""
        for split, n in (("train", train), ("test", test)):
            rng = random.Random(f"lisa-sample/{split}")
            (folder / "images").mkdir(parents=True, exist_ok=True)
            raw = folder / "reasonseg" / split
            raw.mkdir(parents=True, exist_ok=True)
            lines = []
            for i in range(n):
                image, shapes = _scene(rng)
                target = rng.randrange(len(shapes))
                colour, points = shapes[target]
                texts = [f"the object that is {colour}", f"something {colour} in the picture"]
                name = f"{split}_{i:02d}"
                image.save(folder / "images" / f"{name}.png")
                image.save(raw / f"{name}.jpg", quality=90)
                labelme = [{"label": "target", "points": points, "shape_type": "polygon"}]
                (raw / f"{name}.json").write_text(json.dumps({"text": texts, "is_sentence": False, "shapes": labelme}))
                box = [round(v) for v in polygon_box(labelme)]
                lines += [json.dumps({"image_path": f"images/{name}.png", "instruction": t, "boxes": [box]})
                          for t in texts]
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def _size(row: Row) -> tuple[int, int]:
    return int(row["image_size"][0]), int(row["image_size"][1])


def _scene(rng: random.Random) -> tuple[Image.Image, list[tuple[str, list[list[int]]]]]:
    """2-3 polygons of distinct colours in distinct columns of a SAMPLE_SIZE image."""
    w, h = SAMPLE_SIZE
    image = Image.new("RGB", SAMPLE_SIZE, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    k = rng.randint(2, 3)
    colours = rng.sample(list(COLOURS), k)
    shapes = []
    for j, colour in enumerate(colours):
        left, right = j * w // k + 2, (j + 1) * w // k - 2
        x1 = rng.randint(left, right - 8)
        x2 = rng.randint(x1 + 8, right)
        y1 = rng.randint(2, h // 2)
        y2 = rng.randint(y1 + 8, h - 2)
        if rng.random() < 0.5:
            points = [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]
        else:
            points = [[(x1 + x2) // 2, y1], [x2, y2], [x1, y2]]
        draw.polygon([tuple(p) for p in points], fill=COLOURS[colour])
        shapes.append((colour, points))
    return image, shapes
