"""The synthetic `shapes` task: rows, images, prompts, golden completions, options."""

import random
import sys
from collections import Counter

import pytest

from gpg_vl.boxes import NormalizedBoxes, PixelBoxes, ResizedPixelBoxes
from gpg_vl.task import ScoreContext, Task, TaskConfig, UnknownTaskError, build_task, get_task_class, task_names

ALL_KINDS = ["count", "colour", "location"]
PIXELS = ScoreContext(PixelBoxes())
CONVENTIONS = [PixelBoxes(), NormalizedBoxes(), ResizedPixelBoxes(28, 3136, 12544)]


def make(**options):
    return build_task(TaskConfig(name="shapes", options=options))


@pytest.fixture(scope="module")
def task():
    return make(kinds=ALL_KINDS, num_train=1500, num_test=300)


def test_registered():
    assert "shapes" in task_names()
    cls = get_task_class("shapes")
    assert issubclass(cls, Task) and cls.name == "shapes"
    with pytest.raises(UnknownTaskError, match="shapes"):
        get_task_class("shape")


def test_rows_deterministic_and_seeded(task):
    again = make(kinds=ALL_KINDS, num_train=1500, num_test=300)
    assert again.rows("train") == task.rows("train") and again.rows("test") == task.rows("test")
    other = make(kinds=ALL_KINDS, num_train=1500, num_test=300, seed=1)
    assert other.rows("train") != task.rows("train")
    assert len(task.rows("train")) == 1500 and len(task.rows("test")) == 300
    assert [len(make().rows(s)) for s in ("train", "test")] == [4096, 256]
    assert {r["kind"] for r in make().rows("train")} == {"count", "colour"}  # the default kinds
    assert make(kinds="count, location").kinds == ["count", "location"]  # command-line form


def test_train_and_test_images_disjoint(task):
    def images(split):
        return {task.images(r)[0].tobytes() for r in task.rows(split)}

    train, test = images("train"), images("test")
    assert len(test) > 50 and not train & test


def test_unknown_split(task):
    with pytest.raises(ValueError, match="train, test"):
        task.rows("validation")


def test_answers_agree_with_shapes(task):
    for row in task.rows("train") + task.rows("test"):
        shapes, t = row["shapes"], row["target"]
        assert 1 <= len(shapes) <= 3 and row["image_size"] == [56, 56]
        assert len({tuple(s["box"]) for s in shapes}) == len(shapes)  # one shape per cell
        if row["kind"] == "count":
            assert row["answer"] == str(len(shapes)) and t is None
        elif row["kind"] == "colour":
            assert [s["shape"] for s in shapes].count(shapes[t]["shape"]) == 1
            assert row["answer"] == shapes[t]["colour"] and shapes[t]["shape"] in row["question"]
        else:
            pairs = [(s["colour"], s["shape"]) for s in shapes]
            assert pairs.count(pairs[t]) == 1 and row["answer"] == ",".join(map(str, shapes[t]["box"]))
            assert f"{shapes[t]['colour']} {shapes[t]['shape']}" in row["question"]


def test_images_draw_shapes_inside_their_boxes(task):
    module = sys.modules[type(task).__module__]  # the plugin file's constants, as the registry loaded it
    background = module.BACKGROUND
    for row in task.rows("test")[:100]:
        (image,) = task.images(row)
        px = image.load()
        covered = set()
        for s in row["shapes"]:
            x1, y1, x2, y2 = s["box"]
            colour = module.COLOURS[s["colour"]]
            inside = [(x, y) for x in range(x1, x2) for y in range(y1, y2)]
            covered.update(inside)
            assert {px[p] for p in inside} == {colour} | ({background} if s["shape"] != "square" else set())
            painted = [p for p in inside if px[p] == colour]
            # The box is tight: the shape touches all four of its sides.
            assert min(x for x, _ in painted) == x1 and max(x for x, _ in painted) == x2 - 1
            assert min(y for _, y in painted) == y1 and max(y for _, y in painted) == y2 - 1
            assert px[(x1 + x2) // 2, (y1 + y2) // 2] == colour
            if s["shape"] != "square":  # circles and triangles leave the top-left corner empty
                assert px[x1, y1] == background
        outside = {(x, y) for x in range(56) for y in range(56)} - covered
        assert {px[p] for p in outside} == {background}


def test_prompt(task):
    row = next(r for r in task.rows("test") if r["kind"] == "colour")
    (message,) = task.prompt(row)
    assert message["role"] == "user" and message["content"][0] == {"type": "image"}
    assert message["content"][1]["text"] == row["question"] + " Answer with one word."
    assert len(task.images(row)) == 1 and task.images(row)[0].mode == "RGB"


def row_of(kind, answer, shapes, target=None):
    return {"id": "x", "kind": kind, "question": "q", "answer": answer, "shapes": shapes,
            "target": target, "image_size": [56, 56]}


RED_SQUARE = {"shape": "square", "colour": "red", "box": [7, 7, 21, 21]}
BLUE_CIRCLE = {"shape": "circle", "colour": "blue", "box": [35, 35, 49, 49]}
COUNT_ROW = row_of("count", "2", [RED_SQUARE, BLUE_CIRCLE])
COLOUR_ROW = row_of("colour", "blue", [RED_SQUARE, BLUE_CIRCLE], target=1)
LOCATION_ROW = row_of("location", "7,7,21,21", [RED_SQUARE, BLUE_CIRCLE], target=0)


@pytest.mark.parametrize("row,completion,accuracy,fmt", [
    (COUNT_ROW, "2", 1, 1), (COUNT_ROW, " 2\n", 1, 1), (COUNT_ROW, "3", 0, 1), (COUNT_ROW, "7", 0, 0),
    (COUNT_ROW, "two", 0, 0), (COUNT_ROW, "2 3", 0, 0), (COUNT_ROW, "", 0, 0), (COUNT_ROW, "２", 0, 0),
    (COLOUR_ROW, "blue", 1, 1), (COLOUR_ROW, "Blue", 1, 1), (COLOUR_ROW, "red", 0, 1),
    (COLOUR_ROW, "red blue", 0, 0), (COLOUR_ROW, "blue blue", 0, 0), (COLOUR_ROW, "blue.", 0, 0),
    (COLOUR_ROW, "purple", 0, 0), (COLOUR_ROW, "", 0, 0), (COLOUR_ROW, "青", 0, 0),
    (COLOUR_ROW, "blue" * 250_000, 0, 0),
    (LOCATION_ROW, "7,7,21,21", 1, 1), (LOCATION_ROW, "(7,7),(21,21)", 1, 1),
    # gold (7,7,21,21); guess (14,7,28,21): inter 7*14 = 98, union 196+196-98 = 294 -> 1/3
    (LOCATION_ROW, "14,7,28,21", 1 / 3, 1),
    (LOCATION_ROW, "35,35,49,49", 0, 1),  # the other shape's box: no overlap
    (LOCATION_ROW, "21,21,7,7", 0, 1),  # inverted: parses, but encloses nothing
    # guess (-7,-7,21,21) is clipped to the 56x56 image -> (0,0,21,21): IoU = 196/441 = 4/9
    (LOCATION_ROW, "-7,-7,21,21", 4 / 9, 1),
    (LOCATION_ROW, "top left", 0, 0), (LOCATION_ROW, "", 0, 0), (LOCATION_ROW, "x" * 1_000_000, 0, 0),
])
def test_golden_completions(task, row, completion, accuracy, fmt):
    assert task.score(completion, row, PIXELS) == pytest.approx({"accuracy": accuracy, "format": fmt}, abs=1e-9)


@pytest.mark.parametrize("convention", CONVENTIONS, ids=lambda c: c.name)
def test_gold_box_in_each_convention_scores_one(task, convention):
    ctx = ScoreContext(convention)
    for row in [r for r in task.rows("test") if r["kind"] == "location"]:
        gold = row["shapes"][row["target"]]["box"]
        written = convention.from_pixels(gold, (56, 56))  # what a perfect model of that family writes
        got = task.score("({},{}),({},{})".format(*written), row, ctx)
        assert got["format"] == 1.0
        # The 0-1000 grid rounds to 1/1000 of the image: at 56 px a perfect answer keeps IoU >= 0.99.
        assert got["accuracy"] >= (0.99 if isinstance(convention, NormalizedBoxes) else 1.0)
    # Qwen2-VL writes the first cell's box (7,7,21,21) at 56 px as (125,125,375,375).
    assert NormalizedBoxes().from_pixels((7, 7, 21, 21), (56, 56)) == (125, 125, 375, 375)


@pytest.mark.parametrize("size", [56, 60, 64, 112])
def test_gold_box_survives_the_0_1000_grid(size):
    # Qwen2-VL writes boxes in integers on a 0-1000 grid of the image; the rounding costs a
    # perfect answer under 1% IoU at these sizes (boxes of 60-95% of a 28-56 px cell).
    small = make(kinds=["location"], image_size=size, num_train=1, num_test=40)
    ctx = ScoreContext(NormalizedBoxes())
    for row in small.rows("test"):
        written = NormalizedBoxes().from_pixels(row["shapes"][row["target"]]["box"], (size, size))
        assert small.score("{},{},{},{}".format(*written), row, ctx)["accuracy"] >= 0.99


def test_reward_weights():
    default = make()
    assert default.total_reward({"accuracy": 1.0, "format": 1.0}) == 1.0  # format weighs 0 by default
    weighted = make(format_weight=0.5)
    assert weighted.total_reward({"accuracy": 0.0, "format": 1.0}) == 0.5
    assert make().total_reward({"accuracy": 0.0, "format": 1.0}) == 0.0  # the option does not leak into the class


@pytest.mark.parametrize("options,message", [
    ({"max_shape": 3}, "did you mean max_shapes"),
    ({"kinds": ["count", "size"]}, "kinds"), ({"kinds": []}, "kinds"), ({"kinds": "count,size"}, "kinds"), ({"kinds": 3}, "kinds"),
    ({"max_shapes": 10}, "max_shapes"), ({"max_shapes": 0}, "max_shapes"), ({"max_shapes": 2.5}, "max_shapes"),
    ({"image_size": 8}, "image_size"), ({"num_train": 0}, "num_train"), ({"num_test": "5"}, "num_test"),
    ({"seed": 1.5}, "seed"), ({"format_weight": -1}, "format_weight"), ({"format_weight": True}, "format_weight"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=f"(?i){message}"):
        make(**options)


def test_larger_grid():
    big = make(max_shapes=9, kinds=ALL_KINDS, num_train=200, num_test=50)
    counts = Counter(len(r["shapes"]) for r in big.rows("train"))
    assert max(counts) == 9 and len(big.cells) == 9
    for row in big.rows("test")[:20]:
        assert big.score(row["answer"], row, PIXELS) == {"accuracy": 1.0, "format": 1.0}


@pytest.mark.parametrize("kind,chance", [("count", 1 / 3), ("colour", 1 / 4)])
def test_uniform_random_answers_score_chance(task, kind, chance):
    rng = random.Random(0)
    rows = [r for r in task.rows("train") if r["kind"] == kind]
    got = [task.score(rng.choice(task.answer_set(kind)), r, PIXELS)["accuracy"] for r in rows]
    assert sum(got) / len(got) == pytest.approx(chance, abs=0.05)


def test_a_cell_box_scores_by_overlap(task):
    # A gold box lies inside one grid cell: the whole cell scores IoU = gold area / cell area
    # (0.36 to 0.9025 for sides of 60-95% of the cell); any other cell scores 0.
    rows = [r for r in task.rows("train") if r["kind"] == "location"]
    for r in rows[:50]:
        gold = r["shapes"][r["target"]]["box"]
        scores = [task.score("{},{},{},{}".format(*cell), r, PIXELS)["accuracy"] for cell in task.cells]
        assert sorted(scores)[:-1] == [0.0] * (len(scores) - 1)
        side = gold[2] - gold[0]
        cell = task.cells[scores.index(max(scores))]
        assert max(scores) == pytest.approx(side * side / ((cell[2] - cell[0]) * (cell[3] - cell[1])), abs=1e-9)
