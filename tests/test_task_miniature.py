"""The miniature tasks of scripts/compare.py: rows, images, answers, rewards, options."""

import colorsys
import statistics

import pytest

from gpg_vl.boxes import PixelBoxes
from gpg_vl.rewards import box_iou
from gpg_vl.task import ScoreContext, TaskConfig, build_task, held_out, task_names

CTX = ScoreContext(PixelBoxes())
NAMES = ["mini_count", "mini_ground", "mini_classes"]


def make(name, **options):
    return build_task(TaskConfig(name=name, options={"num_train": 300, "num_test": 100, **options}))


@pytest.fixture(scope="module", params=NAMES)
def task(request):
    return make(request.param)


def test_registered():
    assert set(NAMES) <= set(task_names())


def test_rows_deterministic_seeded_and_splits_disjoint(task):
    again = make(task.name)
    assert again.rows("train") == task.rows("train") and again.rows("test") == task.rows("test")
    assert make(task.name, seed=1).rows("train") != task.rows("train")
    train = {task.images(r)[0].tobytes() for r in task.rows("train")}
    test = {task.images(r)[0].tobytes() for r in task.rows("test")}
    assert len(test) > 90 and not train & test
    with pytest.raises(ValueError, match="train, test"):
        task.rows("validation")


def test_every_answer_occurs_and_scores_full_marks(task):
    rows = task.rows("train")
    assert {r["answer"] for r in rows} == set(task.answers)
    for row in rows:
        image = task.images(row)[0]
        assert image.size == tuple(row["image_size"]) == (task.image_size, task.image_size)
        got = task.score(f" {row['answer']}\n", row, CTX)
        assert got["format"] == 1.0
        if task.name == "mini_ground":  # the gold quadrant is the one of largest IoU
            assert got["accuracy"] == max(task.score(d, row, CTX)["accuracy"] for d in task.answers) > 0
        else:
            assert got["accuracy"] == 1.0


@pytest.mark.parametrize("completion", ["", " ", "12", "1 2", "one", "<answer>1</answer>", "0.5", "-1", "x"])
def test_malformed_completions_score_zero(task, completion):
    row = task.rows("test")[0]
    assert task.score(completion, row, CTX) == {"accuracy": 0.0, "format": 0.0}
    assert task.answer(completion, row, CTX) is None


def test_the_answer_is_the_digit_scored(task):
    row = task.rows("test")[0]
    assert task.answer(f"\n{task.answers[-1]} ", row, CTX) == task.answers[-1]


def test_a_wrong_digit_is_well_formed_but_wrong():
    for name in ("mini_count", "mini_classes"):
        task = make(name)
        row = task.rows("test")[0]
        wrong = next(d for d in task.answers if d != row["answer"])
        assert task.score(wrong, row, CTX) == {"accuracy": 0.0, "format": 1.0}


def test_count_images_hold_that_many_white_squares():
    task = make("mini_count")
    for row in task.rows("test")[:40]:
        image = task.images(row)[0]
        assert int(row["answer"]) == len(row["boxes"])
        white = image.convert("L").histogram()[255]  # the rest is black
        assert white == sum((x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in row["boxes"])


def test_ground_reward_is_the_iou_of_the_named_quadrant():
    task = make("mini_ground")
    row = {**task.rows("test")[0], "box": [7, 7, 21, 21]}  # centred: a quarter of it in each quadrant
    for digit in task.answers:
        assert task.score(digit, row, CTX)["accuracy"] == pytest.approx(49 / (196 + 196 - 49))
    row = {**row, "box": [0, 0, 14, 14]}  # exactly quadrant 1
    assert [task.score(d, row, CTX)["accuracy"] for d in task.answers] == [1.0, 0.0, 0.0, 0.0]
    rows = task.rows("test")
    oracle = statistics.fmean(box_iou(task.cells()[int(r["answer"]) - 1], r["box"]) for r in rows)
    assert 0.3 < oracle < 0.5  # straddling squares: no answer is perfect


def test_classes_colour_has_the_class_hue():
    task = make("mini_classes")
    for row in task.rows("train"):
        r, g, b = (c / 255 for c in row["colour"])
        hue = colorsys.rgb_to_hsv(r, g, b)[0] * 10
        distance = min(abs(hue - int(row["answer"])), 10 - abs(hue - int(row["answer"])))
        assert distance <= 0.11


def test_format_weight_and_options():
    task = make("mini_count", format_weight=0.25)
    assert task.total_reward({"accuracy": 1.0, "format": 1.0}) == 1.25
    with pytest.raises(ValueError, match="did you mean num_train"):
        make("mini_count", num_trian=3)
    for bad in ({"num_test": 0}, {"seed": "a"}, {"format_weight": -1}, {"num_train": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make("mini_classes", **bad)


def test_held_out_share_is_about_one_in_share():
    share = sum(held_out(f"item {i}", 4) for i in range(4000)) / 4000
    assert 0.22 < share < 0.28
