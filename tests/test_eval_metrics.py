"""The benchmark metrics against values worked out by hand (gpg_vl/eval_metrics.py and the
tasks' metric hooks)."""

import numpy as np
import pytest

from gpg_vl.boxes import NormalizedBoxes, PixelBoxes
from gpg_vl.eval_metrics import (
    comparison_table,
    decode_rle,
    encode_rle,
    giou_ciou,
    mask_overlap,
    part_columns,
    summary_columns,
)
from gpg_vl.task import ScoreContext, TaskConfig, build_task

PIXELS = ScoreContext(boxes=PixelBoxes())


def records(values, groups=None, component="accuracy"):
    """One record per item; `values[i]` holds the scores of its k completions."""
    out = [{"scores": [{component: v} for v in vs]} for vs in values]
    for record, group in zip(out, groups or []):
        record["group"] = group
    return out


# ---------------------------------------------------------------- lisa: box IoU, mIoU

LISA_ROW = {"image_size": [100, 100], "box": [10.0, 10.0, 50.0, 50.0]}  # gold area 40 x 40 = 1600


@pytest.mark.parametrize("answer, iou", [
    ("(60,60),(80,80)", 0.0),              # no overlap
    ("(20,20),(40,40)", 400 / 1600),       # inside the gold box: 20 x 20 / 1600
    ("(0,0),(100,100)", 1600 / 10000),     # contains the gold box: 1600 / the whole image
    ("(30,10),(70,50)", 800 / 2400),       # half over: 20 x 40 = 800, union 1600 + 1600 - 800
    ("(10,10),(10,50)", 0.0),              # degenerate: zero width
    ("(20,20),(20,20)", 0.0),              # degenerate: a point inside the gold box
    ("(50,50),(10,10)", 0.0),              # inverted corners are not a box
    ("no box at all", 0.0),                # a miss
    ("(1,2),(3", 0.0),                     # unparsable
])
def test_lisa_box_iou(answer, iou):
    task = build_task(TaskConfig(name="lisa"))
    got = task.score(f"<think>x</think> <answer>{answer}</answer>", LISA_ROW, PIXELS)
    assert got["iou"] == pytest.approx(iou, abs=1e-12)


def test_lisa_miou_is_the_mean_iou_with_misses_as_zero():
    task = build_task(TaskConfig(name="lisa"))
    answers = ["(20,20),(40,40)", "(0,0),(100,100)", "nothing", "(60,60),(80,80)"]
    scored = [[task.score(f"<answer>{a}</answer>", LISA_ROW, PIXELS)] for a in answers]
    recs = [{"scores": s} for s in scored]
    # (0.25 + 0.16 + 0 + 0) / 4 = 0.1025
    assert part_columns(recs, task.metric_component, task.metric_label, False, 1) == {"mIoU": pytest.approx(0.1025)}


def test_lisa_parsed_answer_is_the_box_in_original_pixels():
    task = build_task(TaskConfig(name="lisa"))
    row = {"image_size": [200, 100], "box": [0, 0, 10, 10]}
    qwen2_vl = ScoreContext(boxes=NormalizedBoxes(1000))
    # 0-1000 grid: x * 200 / 1000, y * 100 / 1000
    assert task.answer("<answer>(100,200),(500,600)</answer>", row, qwen2_vl) == [20.0, 20.0, 100.0, 60.0]
    assert task.answer("<answer>none</answer>", row, qwen2_vl) is None


# ---------------------------------------------------------------- masks: gIoU, cIoU


def test_mask_giou_and_ciou_through_rle():
    gold_a = np.zeros((4, 4), np.uint8)
    gold_a[0, :] = 1                              # 4 object pixels
    pred_a = np.zeros((4, 4), np.uint8)
    pred_a[0, :2] = 1
    pred_a[3, 3] = 1                              # I = 2, U = 4 + 1 = 5
    gold_b = np.zeros((4, 4), np.uint8)
    gold_b[2, 1:3] = 1                            # 2 object pixels, no prediction: I = 0, U = 2
    gold_c = np.zeros((4, 4), np.uint8)
    gold_c[1, :] = 255                            # no object, an ignored row
    pred_c = np.zeros((4, 4), np.uint8)
    pred_c[1, :] = 1                              # predicted only where ignored: I = 0, U = 0 -> IoU 1
    empty = np.zeros((4, 4), np.uint8)
    decoded = [decode_rle(encode_rle(m)) for m in (pred_a, empty, pred_c)]
    assert all(np.array_equal(d, m) for d, m in zip(decoded, (pred_a, empty, pred_c)))
    overlaps = [mask_overlap(p, g) for p, g in zip(decoded, (gold_a, gold_b, gold_c))]
    assert overlaps == [(2, 5), (0, 2), (0, 0)]
    got = giou_ciou(overlaps)
    assert got["gIoU"] == pytest.approx((2 / 5 + 0 + 1) / 3)      # 0.4667
    assert got["cIoU"] == pytest.approx((2 + 0 + 0) / (5 + 2 + 0))  # 0.2857


def test_uncompressed_rle_and_a_size_mismatch():
    # column-major runs: 1 zero, 2 ones, 3 zeros over a 2 x 3 mask
    mask = decode_rle({"size": [2, 3], "counts": [1, 2, 3]})
    assert mask.tolist() == [[0, 1, 0], [1, 0, 0]]
    with pytest.raises(ValueError, match="predicted mask is 3x2"):
        mask_overlap(mask, np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="COCO RLE"):
        decode_rle([1, 2, 3])


def test_reasonseg_polygons_give_the_gold_mask():
    shapes = [{"label": "target", "points": [[1, 1], [4, 1], [4, 4], [1, 4]]},
              {"label": "ignore", "points": [[2, 2], [3, 2], [3, 3], [2, 3]]},  # smaller: drawn over the target
              {"label": "flag", "points": [[0, 0], [5, 0], [5, 5]]}]  # not part of the mask
    mask = build_task(TaskConfig(name="lisa")).gold_mask({"image_size": [6, 6], "shapes": shapes})
    assert mask.shape == (6, 6)
    assert (mask == 255).sum() == 4 and (mask == 1).sum() == 16 - 4 and mask[0, 5] == 0
    assert build_task(TaskConfig(name="lisa")).gold_mask(LISA_ROW) is None  # processed rows have no polygons
    # Labels compare as LISA's loader compares them: any case, "ignore" anywhere in the label.
    relabelled = [{**shapes[0]}, {**shapes[1], "label": "Ignore region"}, {**shapes[2], "label": "FLAG"}]
    again = build_task(TaskConfig(name="lisa")).gold_mask({"image_size": [6, 6], "shapes": relabelled})
    assert np.array_equal(again, mask)


# ---------------------------------------------------------------- cvbench: categories and weighted total


def test_cvbench_categories_and_sample_weighted_total():
    recs = records([[1], [1], [0], [0], [1], [0]], ["Count", "Count", "Count", "Relation", "Depth", "Depth"])
    got = part_columns(recs, "accuracy", "accuracy", True, 1)
    assert list(got) == ["Count", "Relation", "Depth", "Total"]
    assert got["Count"] == pytest.approx(2 / 3) and got["Relation"] == 0 and got["Depth"] == 0.5
    assert got["Total"] == pytest.approx(0.5)  # 3 of 6 items, not the mean of the categories (0.389)


# ---------------------------------------------------------------- math: pass@1, mean@k, the suite average


def test_pass_at_1_is_the_first_sample_and_mean_at_k_all_samples():
    recs = records([[1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 0]])
    got = part_columns(recs, "accuracy", "pass@1", False, 3)
    assert got["pass@1"] == pytest.approx(0.5)          # first samples 1, 0, 1, 0
    assert got["mean@3"] == pytest.approx(7 / 12)      # 7 of 12 samples correct


def test_suite_average_and_splits_side_by_side():
    aime = {"name": "aime24", "metrics": {"pass@1": 0.30, "mean@4": 0.25}, "headline": "pass@1"}
    amc = {"name": "amc23", "metrics": {"pass@1": 0.60, "mean@4": 0.55}, "headline": "pass@1"}
    columns, headline = summary_columns([aime, amc], suite=True)
    assert columns["average pass@1"] == pytest.approx(0.45) and columns["average mean@4"] == pytest.approx(0.40)
    assert headline == pytest.approx(0.45)
    test = {"name": "test", "metrics": {"mIoU": 0.518}, "headline": "mIoU"}
    val = {"name": "val", "metrics": {"mIoU": 0.513}, "headline": "mIoU"}
    columns, headline = summary_columns([test, val], suite=False)
    assert columns == {"test mIoU": 0.518, "val mIoU": 0.513} and headline == 0.518


# ---------------------------------------------------------------- classification: the average of four sets


def summary(task, name, value):
    return {"task": task, "name": name, "columns": {"accuracy": value}, "headline": value}


def test_classification_average_over_the_four_sets():
    sets = ("flower102", "pets37", "fgvc_aircraft", "cars196")
    summaries = [summary(t, "base", v) for t, v in zip(sets, (0.80, 0.60, 0.40, 0.21))]
    summaries += [summary(t, "gpg", v) for t, v in zip(sets, (0.90, 0.90, 0.80, 0.80))]
    lines = comparison_table(summaries).splitlines()  # fractions, printed in percent as the paper
    assert lines[0] == "| model | flower102 | pets37 | fgvc_aircraft | cars196 | average |"
    assert lines[2] == "| base | 80.00 | 60.00 | 40.00 | 21.00 | 50.25 |"  # (80 + 60 + 40 + 21) / 4
    assert lines[3] == "| gpg | 90.00 | 90.00 | 80.00 | 80.00 | 85.00 |"


def test_merge_names_missing_cells_and_clashes():
    table = comparison_table([summary("flower102", "x", 0.8), summary("pets37", "y", 0.6)], names=["a", "b"])
    assert "| a | 80.00 | – | – |" in table and "| b | – | 60.00 | – |" in table
    with pytest.raises(ValueError, match="one name per summary"):
        comparison_table([summary("flower102", "x", 0.8)], names=["a", "b"])
    with pytest.raises(ValueError, match="two summaries of task 'flower102'"):
        comparison_table([summary("flower102", "x", 0.8), summary("flower102", "x", 0.7)])
