"""Golden cases for the shared reward pieces. Expected IoU/GIoU values are derived in the comment above each."""

import math
import random
import time

import pytest

from gpg_vl.rewards import (
    THINK_ANSWER_RE, ChoiceMatcher, box_giou, box_iou, choice_key, clip_box, extract_tag, has_think_answer_format,
    normalize_number, numbers_match, parse_box,
)

TOL = 1e-9
HUGE = "x" * 1_000_000

# ---------------------------------------------------------------- format and tags

FORMAT_CASES = [
    ("<think>a</think><answer>b</answer>", True),
    ("  \n<think>a\nb</think>\n\n<answer>\nred\n</answer>\n ", True),
    ("<think></think><answer></answer>", True),
    ("<think>a</think> <answer>b</answer> trailing", False),
    ("<think>a</think> between <answer>b</answer>", False),
    ("<answer>b</answer>", False),
    ("<think>a</think>", False),
    ("<think>a<answer>b</answer>", False),
    ("<answer>b</answer><think>a</think>", False),
    ("<think>思考</think><answer>红色</answer>", True),
    ("", False),
]


@pytest.mark.parametrize("text,expected", FORMAT_CASES)
def test_think_answer_format(text, expected):
    assert has_think_answer_format(text) is expected
    # The linear-time check decides exactly what the documented regular expression decides.
    assert (THINK_ANSWER_RE.fullmatch(text.strip()) is not None) is expected


def test_think_answer_format_is_fast_on_adversarial_text():
    # Many "</think><answer>" pairs make the plain regex backtrack quadratically.
    text = "<think>" + "</think><answer>" * 60_000 + "x"
    start = time.perf_counter()
    assert not has_think_answer_format(text)
    assert not has_think_answer_format(HUGE)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("text,tag,expected", [
    ("<think>t</think><answer> red </answer>", "answer", "red"),
    ("<answer>a</answer> then <answer>b</answer>", "answer", "b"),
    ("<answer>a<answer>b</answer>", "answer", "b"),
    ("<answer>a</answer><answer>unclosed", "answer", "a"),
    ("<answer>unclosed", "answer", None),
    ("</answer>only closing", "answer", None),
    ("<answer></answer>", "answer", ""),
    ("<think> why </think>", "think", "why"),
    ("no tags", "answer", None),
    ("<answer>グレー</answer>", "answer", "グレー"),
    (HUGE + "<answer>1</answer>", "answer", "1"),
])
def test_extract_tag(text, tag, expected):
    assert extract_tag(text, tag) == expected


# ---------------------------------------------------------------- boxes


@pytest.mark.parametrize("text,expected", [
    ("(10,20),(30,40)", (10, 20, 30, 40)),
    ("(10, 20), (30, 40)", (10, 20, 30, 40)),
    ("[10, 20, 30, 40]", (10, 20, 30, 40)),
    ("[[1,2],[3,4]]", (1, 2, 3, 4)),
    ("10,20,30,40", (10, 20, 30, 40)),
    ("10 20 30 40", (10, 20, 30, 40)),
    ("<|box_start|>(100,200),(300,400)<|box_end|>", (100, 200, 300, 400)),
    ("box (1.5, -2.5), (3, 4) and [5,6,7,8]", (1.5, -2.5, 3, 4)),
    ("框：(1,2),(3,4)", (1, 2, 3, 4)),
    ("(30,40),(10,20)", (30, 40, 10, 20)),  # inverted: returned as written
    ("1,2,3", None),
    ("one two three four", None),
    ("", None),
    ("9" * 400 + ",1,2,3", None),  # overflows to inf
    (HUGE + " (1,2),(3,4)", (1, 2, 3, 4)),
])
def test_parse_box(text, expected):
    assert parse_box(text) == expected


IOU_CASES = [
    # identical: inter 100 = union 100 -> 1; hull = union -> GIoU 1
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0, 1.0),
    # no overlap: inter 0 -> 0; hull 30*30 = 900, union 200 -> GIoU 0 - 700/900 = -7/9
    ((0, 0, 10, 10), (20, 20, 30, 30), 0.0, -7 / 9),
    # containment: inter 4*4 = 16, union 100 -> 0.16; hull = outer box = union -> GIoU 0.16
    ((0, 0, 10, 10), (2, 2, 6, 6), 0.16, 0.16),
    # half shifted on x: inter 5*10 = 50, union 150 -> 1/3; hull 15*10 = 150 = union -> 1/3
    ((0, 0, 10, 10), (5, 0, 15, 10), 1 / 3, 1 / 3),
    # diagonal corner overlap: inter 2*2 = 4, union 16+16-4 = 28 -> 1/7; hull 6*6 = 36 -> 1/7 - 8/36 = -5/63
    ((0, 0, 4, 4), (2, 2, 6, 6), 1 / 7, -5 / 63),
    # touching edges: inter 0; hull 20*10 = 200 = union -> GIoU 0
    ((0, 0, 10, 10), (10, 0, 20, 10), 0.0, 0.0),
    # inverted box: not a box -> IoU 0, GIoU -1
    ((10, 0, 0, 10), (0, 0, 10, 10), 0.0, -1.0),
    ((0, 10, 10, 0), (0, 0, 10, 10), 0.0, -1.0),
    # point inside: area 0 -> IoU 0; hull = the big box = union 100 -> GIoU 0
    ((5, 5, 5, 5), (0, 0, 10, 10), 0.0, 0.0),
    # point outside: hull 20*20 = 400, union 100 -> GIoU -300/400 = -0.75
    ((20, 20, 20, 20), (0, 0, 10, 10), 0.0, -0.75),
    # line on the edge: inter 0, union 100, hull 100 -> GIoU 0
    ((0, 0, 10, 0), (0, 0, 10, 10), 0.0, 0.0),
    # the same point twice: union 0 and hull 0 -> both 0, no division by zero
    ((1, 1, 1, 1), (1, 1, 1, 1), 0.0, 0.0),
    # non-finite coordinates: not a box
    ((0, 0, math.inf, 10), (0, 0, 10, 10), 0.0, -1.0),
    ((0, 0, math.nan, 10), (0, 0, 10, 10), 0.0, -1.0),
]


@pytest.mark.parametrize("a,b,iou,giou", IOU_CASES)
def test_iou_and_giou(a, b, iou, giou):
    for x, y in ((a, b), (b, a)):  # both are symmetric
        assert box_iou(x, y) == pytest.approx(iou, abs=TOL)
        assert box_giou(x, y) == pytest.approx(giou, abs=TOL)


def test_clip_to_image():
    assert clip_box((-10, -5, 30, 8), (20, 10)) == (0, 0, 20, 8)
    # unclipped: inter 100, union 20*20 = 400 -> 0.25; hull = the big box = union -> GIoU 0.25
    assert box_iou((-10, -10, 10, 10), (0, 0, 10, 10)) == pytest.approx(0.25, abs=TOL)
    assert box_giou((-10, -10, 10, 10), (0, 0, 10, 10)) == pytest.approx(0.25, abs=TOL)
    # clipped to a 20x20 image the prediction becomes (0, 0, 10, 10): IoU = GIoU = 1
    assert box_iou((-10, -10, 10, 10), (0, 0, 10, 10), (20, 20)) == pytest.approx(1.0, abs=TOL)
    assert box_giou((-10, -10, 10, 10), (0, 0, 10, 10), (20, 20)) == pytest.approx(1.0, abs=TOL)
    # wholly outside the image: clipped to the line x = 20, area 0 -> IoU 0
    assert box_iou((30, 0, 40, 10), (0, 0, 10, 10), (20, 20)) == 0.0


def test_iou_giou_ranges_on_random_boxes():
    rng = random.Random(0)
    for _ in range(2000):
        a, b = (tuple(rng.uniform(-5, 15) for _ in range(4)) for _ in range(2))
        iou, giou = box_iou(a, b), box_giou(a, b)
        assert 0.0 <= iou <= 1.0 and -1.0 <= giou <= 1.0 and giou <= iou + TOL


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize("text,expected", [
    ("140", 140.0), (" 140 ", 140.0), ("140°", 140.0), ("140 degrees", 140.0), ("140.", 140.0),
    ("$140^\\circ$", 140.0), ("140^{\\circ}", 140.0), ("3.5cm", 3.5), ("3 \\text{cm}", 3.0),
    ("5 cm^2", 5.0), ("1,000", 1000.0), ("1,000,000.5", 1000000.5), ("-2", -2.0), ("\u22122", -2.0),
    (".5", 0.5), ("1/2", 0.5), ("-1/2", -0.5), ("\\frac{1}{2}", 0.5), ("-\\dfrac{3}{4}", -0.75),
    ("50%", 50.0), ("50\\%", 50.0), ("\uff11\uff14\uff10", 140.0),  # full-width digits
    ("", None), ("abc", None), ("2 or 3", None), ("1,5", None), ("1/0", None), ("1e5", 100000.0), ("3e2", 300.0), ("2.5E-1 cm", 0.25),
    ("x = 5", None), ("9" * 400, None), ("1" + " " * 100_000 + "x1", None), (HUGE, None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_numbers_match():
    assert numbers_match("140", "140°") and numbers_match(" 140 ", 140) and numbers_match("0.5", "\\frac{1}{2}")
    assert numbers_match(1000, "1000.05")  # relative difference 5e-5 < 1e-4
    assert not numbers_match(1000, 1001)  # relative difference 1e-3
    assert numbers_match(0, 1e-7) and not numbers_match(0, 1e-5)  # near zero the absolute tolerance decides
    assert not numbers_match("140", "141") and not numbers_match("abc", "abc") and not numbers_match("", "")


# ---------------------------------------------------------------- choices

CLASSES = ["red", "green", "Sea_Lion", "Café"]


@pytest.mark.parametrize("answer,expected", [
    ("red", "red"), ("  RED ", "red"), ("sea lion", "Sea_Lion"), ("SeaLion", "Sea_Lion"), ("café", "Café"),
    ("", None), ("   ", None),  # an empty answer names nothing (Visual-RFT issue 79)
    ("red or green", None), ("red, green", None),  # several classes at once (issue 176)
    ("re", None), ("reddish", None), ("blue", None), (HUGE, None),
])
def test_the_whole_answer_names_one_choice(answer, expected):
    assert ChoiceMatcher(CLASSES).whole(answer) == expected


@pytest.mark.parametrize("answer,expected", [
    ("It is a sea-lion.", "Sea_Lion"), ("red.", "red"), ("RED!", "red"), ("ｒｅｄ", "red"), ("（ｒｅｄ）", "red"),
    ("red or green", None), ("red, green", None), ("reddish", None), ("", None), (HUGE, None),
])
def test_a_choice_named_among_other_words(answer, expected):
    assert ChoiceMatcher(CLASSES).named(answer) == expected


def test_hyphens_spaces_underscores_and_width_are_one_key():
    # One rule for every task: classification and sat/cvbench compare choices alike.
    assert len({choice_key(s) for s in ("desert-rose", "Desert Rose", "desert_rose", "ＤＥＳＥＲＴ ＲＯＳＥ")}) == 1


@pytest.mark.parametrize("choices,message", [
    (["sea lion", "Sea_Lion"], "the same once case"), (["a-b", "A B"], "the same once case"),
    (["red", " - "], "empty once spaces"), ([], "empty"),
])
def test_choices_the_reward_cannot_tell_apart_are_refused(choices, message):
    with pytest.raises(ValueError, match=message):
        ChoiceMatcher(choices)
