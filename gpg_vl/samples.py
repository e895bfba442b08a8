"""The bundled samples: each file-backed task's offline sample, in its data set's real on-disk
layout, with generated images whose answers are true. They are what a task reads when
`task.data_path` is empty, so every task runs end to end without a download.

    python -m gpg_vl.samples --out DIR [NAME ...]    (default: every sample, into gpg_vl/assets/samples)

Writing them again gives the same bytes (tests/test_samples.py checks the bundled files).
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import math
import random
import string
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageDraw

from gpg_vl.resources import SAMPLES
from gpg_vl.tasks.classification import CLASSES_FILE, FORMAT_INSTRUCTION, Cars196Task, FGVCAircraftTask, \
    Flower102Task, Pets37Task
from gpg_vl.tasks.lisa import polygon_box
from gpg_vl.tasks.math_reasoning import BOXED_INSTRUCTION

LETTERS = string.ascii_uppercase
SQUARE_COLOURS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210)}


def _jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _parquet(path: Path, records: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)


# ---------------------------------------------------------------- classification

CLASSES = {
    Flower102Task: ("pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea",
                    "english marigold", "tiger lily", "rose", "desert-rose"),
    Pets37Task: ("abyssinian", "american bulldog", "american pit bull terrier", "basset hound", "beagle", "bengal",
                 "birman", "staffordshire bull terrier"),
    FGVCAircraftTask: ("707-320", "727-200", "737-200", "737-300", "747-100", "747-200", "A320", "A321"),
    Cars196Task: ("AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012", "Acura TL Type-S 2008",
                  "Acura TSX Sedan 2012", "Acura Integra Type R 2001", "Acura ZDX Hatchback 2012",
                  "Aston Martin V8 Vantage Convertible 2012"),
}


def class_image(index: int, count: int, rng: random.Random) -> Image.Image:
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


def classification_sample(task: type, folder: Path) -> None:
    """Visual-RFT's layout: 2 training and 1 test image per class, and the class list."""
    classes, name = CLASSES[task], task.name
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / CLASSES_FILE).write_text("\n".join(classes) + "\n", encoding="utf-8")
    problem = f"{task.question()}\n{FORMAT_INSTRUCTION}"
    for split, shots in (("train", 2), ("test", 1)):
        lines = []
        for i in range(shots * len(classes)):
            path = f"images/{split}_{i:02d}.png"
            class_image(i % len(classes), len(classes), random.Random(f"{name}/{split}/{i}")).save(
                folder / path, optimize=True)
            lines.append(json.dumps({"image": path, "problem": problem,
                                     "solution": f"<answer>{classes[i % len(classes)]}</answer>"}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- lisa

POLYGON_COLOURS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210), "yellow": (230, 200, 30)}
LISA_SIZE = (100, 75)  # not multiples of 28: Qwen2.5-VL's resize changes them (boxes must follow)


def polygon_scene(rng: random.Random) -> tuple[Image.Image, list[tuple[str, list[list[int]]]]]:
    """2-3 polygons of distinct colours in distinct columns of a LISA_SIZE image, on grey."""
    w, h = LISA_SIZE
    image = Image.new("RGB", LISA_SIZE, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    k = rng.randint(2, 3)
    shapes = []
    for j, colour in enumerate(rng.sample(list(POLYGON_COLOURS), k)):
        left, right = j * w // k + 2, (j + 1) * w // k - 2
        x1 = rng.randint(left, right - 8)
        x2 = rng.randint(x1 + 8, right)
        y1 = rng.randint(2, h // 2)
        y2 = rng.randint(y1 + 8, h - 2)
        if rng.random() < 0.5:
            points = [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]
        else:
            points = [[(x1 + x2) // 2, y1], [x2, y2], [x1, y2]]
        draw.polygon([tuple(p) for p in points], fill=POLYGON_COLOURS[colour])
        shapes.append((colour, points))
    return image, shapes


def lisa_sample(folder: Path, train: int = 10, test: int = 8) -> None:
    """Both layouts of the same scenes: processed rows (<split>.jsonl + images/) and the raw
    ReasonSeg form (reasonseg/<split>/NAME.jpg + NAME.json)."""
    for split, n in (("train", train), ("test", test)):
        rng = random.Random(f"lisa-sample/{split}")
        (folder / "images").mkdir(parents=True, exist_ok=True)
        raw = folder / "reasonseg" / split
        raw.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            image, shapes = polygon_scene(rng)
            colour, points = shapes[rng.randrange(len(shapes))]
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


# ---------------------------------------------------------------- sat and cvbench


def square_scene(rng: random.Random, least: int = 1) -> tuple[Image.Image, list[tuple[str, int, int]]]:
    """A 64x64 image with `least`-3 squares of distinct colours: (colour, centre x, size) each."""
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    found = []
    for j, colour in enumerate(rng.sample(list(SQUARE_COLOURS), rng.randint(least, 3))):
        side, cx = rng.randint(6, 14), 11 + 21 * j
        top = rng.randint(2, 62 - side)
        draw.rectangle([cx - side // 2, top, cx + side // 2, top + side], fill=SQUARE_COLOURS[colour])
        found.append((colour, cx, side))
    return image, found


def sat_record(rng: random.Random, name: str, index: int) -> tuple[dict[str, Any], list[Image.Image]]:
    """A SAT row (image_bytes as paths); the first has two images, as SAT's motion questions do."""
    image, found = square_scene(rng)
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
    """A CV-Bench row of each category in turn (images under img/2D or img/3D)."""
    task = ("Count", "Relation", "Depth", "Distance")[index % 4]
    image, found = square_scene(rng, 1 if task == "Count" else 2)
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


def choice_sample(folder: Path, sizes: dict[str, int], make: Callable) -> None:
    for split, n in sizes.items():
        rng = random.Random(f"{make.__name__}/{split}")  # the same sample wherever it is written
        lines = []
        for i in range(n):
            record, images = make(rng, f"{split}_{i:02d}", i)
            for path, image in zip(record.get("image_bytes") or [record["filename"]], images):
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                image.save(folder / path)
            lines.append(json.dumps(record))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- geoqa


def angle_problem(rng: random.Random, i: int) -> tuple[Image.Image, str, int]:
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
    for xy, name in (((60, 58), "1"), ((34, 58), "2"), ((45, 73), "O")):
        draw.text(xy, name, fill=0)
    question = f"As shown in the figure, point O lies on a straight line, angle 1 = {a}°, then angle 2 is ()"
    return image, question, 180 - a


def geoqa_sample(folder: Path, per_split: int = 10) -> None:
    """GeoQA's two layouts: train.parquet with embedded PNGs as on the hub, test.jsonl with
    image files as R1-V's test file."""
    rng = random.Random(0)
    (folder / "images" / "test").mkdir(parents=True, exist_ok=True)
    train, test = [], []
    for i in range(2 * per_split):
        image, question, answer = angle_problem(rng, i)
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=True)
        if i < per_split:
            train.append({"image": {"bytes": buf.getvalue(), "path": f"{i}.png"}, "problem": question,
                          "solution": f"<answer>{answer}</answer>"})
        else:
            rel = f"./images/test/{i - per_split}.png"
            (folder / rel).write_bytes(buf.getvalue())
            test.append({"image_path": rel, "question": question, "ground_truth": f"{answer}°"})
    _parquet(folder / "train.parquet", train)
    _jsonl(folder / "test.jsonl", test)


# ---------------------------------------------------------------- math

# SimpleRL-Zoo's `input` field: the question already inside Qwen's chat template.
SIMPLERL_INPUT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{question}\n"
                  + BOXED_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")


def math_problem(rng: random.Random) -> tuple[str, str]:
    """A small problem and its answer in LaTeX: a sum, a linear equation or a fraction."""
    a, b, c = rng.randint(2, 9), rng.randint(2, 20), rng.randint(1, 9)
    kind = rng.randrange(3)
    if kind == 0:
        return f"What is ${b} + {c} \\times {a}$?", str(b + c * a)
    if kind == 1:
        return f"Solve for $x$: ${a}x + {b} = {a * c + b}$.", str(c)
    # c and ac + 1 share no factor, so c / (ac + 1) is already in lowest terms.
    return f"Simplify $\\frac{{{2 * c}}}{{{2 * (a * c + 1)}}}$.", f"\\frac{{{c}}}{{{a * c + 1}}}"


def math_sample(folder: Path, per_split: int = 10) -> None:
    """Problems in SimpleRL-Zoo's parquet layout (the math task)."""
    rng = random.Random(0)
    for split in ("train", "test"):
        records = []
        for _ in range(per_split):
            question, answer = math_problem(rng)
            records.append({"input": SIMPLERL_INPUT.replace("{question}", question), "question": question,
                            "gt_answer": answer, "target": answer, "subject": "Algebra", "level": 3})
        _parquet(folder / f"{split}.parquet", records)


def math_rs_sample(folder: Path, per_split: int = 10) -> None:
    """Problems in open-s1's layout, JSON lines of problem and solution (the math_rs task)."""
    rng = random.Random(1)
    for split in ("train", "test"):
        records = []
        for _ in range(per_split):
            problem, answer = math_problem(rng)
            records.append({"problem": problem, "solution": f"Working it out step by step gives ${answer}$. "
                                                            f"The answer is $\\boxed{{{answer}}}$."})
        _jsonl(folder / f"{split}.jsonl", records)


WRITERS: dict[str, Callable[[Path], None]] = {
    **{task.name: (lambda folder, task=task: classification_sample(task, folder)) for task in CLASSES},
    "lisa": lisa_sample,
    "sat": lambda folder: choice_sample(folder, {"train": 12, "test": 8}, sat_record),
    "cvbench": lambda folder: choice_sample(folder, {"test": 12}, cvbench_record),
    "geoqa": geoqa_sample,
    "math": math_sample,
    "math_rs": math_rs_sample,
}
"""Sample folder name -> the function that writes it."""


def write_samples(out: Path, names: list[str] | None = None) -> list[Path]:
    written = []
    for name in names or list(WRITERS):
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        WRITERS[name](folder)
        written.append(folder)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the bundled task samples.")
    parser.add_argument("--out", type=Path, default=SAMPLES, help="folder to write the sample folders into")
    parser.add_argument("names", nargs="*", help=f"samples to write (default: all of {', '.join(WRITERS)})")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(WRITERS))
    if unknown:
        parser.error(f"no sample {', '.join(unknown)}; the samples are {', '.join(WRITERS)}")
    for folder in write_samples(args.out, args.names):
        print(folder)


if __name__ == "__main__":
    main()
