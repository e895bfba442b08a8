"""The `lisa` reasoning-grounding task: loaders (processed rows and raw ReasonSeg), prompt,
golden completions, box conventions, bad rows and a tiny training run."""

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from gpg_vl.boxes import NormalizedBoxes, PixelBoxes, ResizedPixelBoxes, smart_resize
from gpg_vl.datafiles import BadRowError
from gpg_vl.task import ScoreContext, TaskConfig, build_task, task_names

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "assets" / "samples" / "lisa"
PIXELS = ScoreContext(PixelBoxes())
ROW = {"id": "x", "image": "", "image_size": [100, 75], "instruction": "i", "box": [20.0, 10.0, 60.0, 50.0]}


def make(**config):
    return build_task(TaskConfig(name="lisa", **config))


def think(answer: str) -> str:
    return f"<think>looking</think> <answer>{answer}</answer>"


def test_registered_and_sample_rows():
    assert "lisa" in task_names()
    task = make()
    train, test = task.rows("train"), task.rows("test")
    assert (len(train), len(test)) == (20, 16)  # 10 and 8 images, two instructions each
    assert train[0]["instruction"] != train[1]["instruction"] and train[0]["box"] == train[1]["box"]
    for row in train + test:
        (image,) = task.images(row)
        assert list(image.size) == row["image_size"] == [100, 75]
        x1, y1, x2, y2 = row["box"]
        assert 0 <= x1 < x2 <= 100 and 0 <= y1 < y2 <= 75
        assert image.getpixel((int(x1 + x2) // 2, int(y2) - 1)) != (128, 128, 128)  # the shape is there


def test_raw_reasonseg_layout_gives_the_same_rows():
    processed, raw = make(), make(data_path=str(SAMPLE / "reasonseg"))
    for split in ("train", "test"):
        strip = [{k: r[k] for k in ("instruction", "box", "image_size")} for r in processed.rows(split)]
        assert strip == [{k: r[k] for k in ("instruction", "box", "image_size")} for r in raw.rows(split)]


def test_prompt():
    task = make()
    row = task.rows("train")[0]
    (message,) = task.prompt(row)
    assert message["role"] == "user" and message["content"][0] == {"type": "image"}
    text = message["content"][1]["text"]
    assert text.startswith(f"Output the bounding box in the image corresponding to the instruction: {row['instruction']}\n")
    assert "<think>" in text and "<answer>(x1,y1),(x2,y2)</answer>" in text


@pytest.mark.parametrize("completion,accuracy,fmt,iou", [
    (think("(20,10),(60,50)"), 2, 1, 1),
    (think("[20, 10, 60, 50]"), 2, 1, 1),
    # guess (40,10,80,50): inter 20*40 = 800, union 1600+1600-800 = 2400, IoU 1/3; hull 60*40 = 2400
    # = union, so GIoU = IoU and accuracy = 1 + 1/3
    (think("(40,10),(80,50)"), 4 / 3, 1, 1 / 3),
    # disjoint (70,10,90,50): IoU 0; union 1600+800 = 2400, hull 70*40 = 2800 -> GIoU -400/2800 = -1/7
    (think("(70,10),(90,50)"), 6 / 7, 1, 0),
    (think("(60,50),(20,10)"), 0, 1, 0),  # inverted: not a box, GIoU -1
    # (-20,-10,60,50) is clipped to (0,0,60,50): IoU 1600/3000, hull = the clipped box -> GIoU = IoU
    (think("(-20,-10),(60,50)"), 1 + 1600 / 3000, 1, 1600 / 3000),
    (think("(20,10),(60,50) or (0,0),(5,5)"), 2, 1, 1),  # the first box counts
    (think("the chair"), 0, 1, 0),
    (think(""), 0, 1, 0),
    (think("9" * 400 + ",1,2,3"), 0, 1, 0),  # not a finite number
    ("(20,10),(60,50)", 0, 0, 0),  # a box outside the tags scores nothing
    ("<think>(20,10),(60,50)</think><answer>none</answer>", 0, 1, 0),
    ("<think>a</think><answer>(20,10),(60,50)", 0, 0, 0),  # unclosed answer
    ("<answer>(20,10),(60,50)</answer>", 2, 0, 1),  # right box, wrong format
    ("", 0, 0, 0),
    ("<think>ça 思考 🙂</think><answer>(20,10),(60,50)</answer>", 2, 1, 1),
    ("<think>" + "x" * 100_000 + "</think><answer>(20,10),(60,50)</answer>", 2, 1, 1),
    ("(" * 100_000, 0, 0, 0),
    # the point (1,1,1,1): IoU 0, hull 59*49 = 2891, union 1600 -> GIoU = -1291/2891
    ("<answer>" * 50_000 + "1 " * 50_000 + "</answer>", 1 - 1291 / 2891, 0, 0),
])
def test_golden_completions(completion, accuracy, fmt, iou):
    start = time.perf_counter()
    got = make().score(completion, ROW, PIXELS)
    assert time.perf_counter() - start < 1.0
    assert got == pytest.approx({"accuracy": accuracy, "format": fmt, "iou": iou}, abs=1e-6)


def test_reward_weights():
    task = make()
    assert task.total_reward({"accuracy": 1.5, "format": 1.0, "iou": 0.4}) == 2.5  # iou is logged only


ROW_100x75 = {**ROW, "box": [25.0, 25.0, 50.0, 50.0]}


def test_box_conventions_score_the_gold_box_fully():
    # Qwen2.5-VL at these limits sees 100x75 as 112x84 (sides rounded to multiples of 28),
    # so it writes (25,25,50,50) as (28,28,56,56); Qwen2-VL writes it on its 0-1000 grid.
    resized = ResizedPixelBoxes(28, 3136, 401408)
    assert smart_resize(75, 100, 28, 3136, 401408) == (112, 84)
    task = make()
    got = task.score(think("(28,28),(56,56)"), ROW_100x75, ScoreContext(resized))
    assert got == pytest.approx({"accuracy": 2, "format": 1, "iou": 1}, abs=1e-9)
    assert NormalizedBoxes().from_pixels((25, 25, 50, 50), (100, 75)) == (250, 333, 500, 667)
    got = task.score(think("(250,333),(500,667)"), ROW_100x75, ScoreContext(NormalizedBoxes()))
    assert got["iou"] > 0.99 and got["accuracy"] > 1.99


def test_a_box_on_the_wrong_scale_scores_low():
    task = make()
    # Qwen2-VL writing pixels: (25,25,50,50) on the 0-1000 grid is (2.5,1.9,5,3.8) px, far from the gold.
    wrong = task.score(think("(25,25),(50,50)"), ROW_100x75, ScoreContext(NormalizedBoxes()))
    assert wrong["iou"] == 0 and wrong["accuracy"] < 0.5
    # Qwen2.5-VL writing the 0-1000 grid: (223,297,446,595) px, clipped to the corner point (100,75):
    # GIoU = 0 - (hull 75*50 - union 625) / hull = -5/6.
    wrong = task.score(think("(250,333),(500,667)"), ROW_100x75, ScoreContext(ResizedPixelBoxes(28, 3136, 401408)))
    assert wrong == pytest.approx({"accuracy": 1 / 6, "format": 1, "iou": 0}, abs=1e-9)


@pytest.mark.parametrize("convention", [NormalizedBoxes(), ResizedPixelBoxes(28, 3136, 401408), PixelBoxes()],
                         ids=lambda c: c.name)
def test_every_sample_gold_box_scores_high_in_each_convention(convention):
    task, ctx = make(), ScoreContext(convention)
    for row in task.rows("test"):
        written = convention.from_pixels(tuple(row["box"]), tuple(row["image_size"]))
        got = task.score(think("({},{}),({},{})".format(*written)), row, ctx)
        assert got["iou"] > 0.85 and got["format"] == 1  # rounding to whole units of the model's grid


def test_no_options():
    with pytest.raises(ValueError, match="Known options: none"):
        make(options={"prompt": "base"})


# ---------------------------------------------------------------- bad rows

def png(folder: Path, name: str, size=(40, 30)) -> str:
    Image.new("RGB", size, (9, 9, 9)).save(folder / name)
    return name


GOOD = {"image_path": "a.png", "instruction": "the dark thing", "boxes": [[1, 2, 30, 20]]}


@pytest.mark.parametrize("bad,message", [
    ({k: v for k, v in GOOD.items() if k != "boxes"}, "missing field 'boxes'"),
    ({k: v for k, v in GOOD.items() if k != "image_path"}, "missing field 'image_path'"),
    ({**GOOD, "image_path": "gone.png"}, "image not found"),
    ({**GOOD, "image_path": "corrupt.png"}, "unreadable image"),
    ({**GOOD, "boxes": [[1, 2, 45, 20]]}, "outside the 40x30 image"),
    ({**GOOD, "boxes": [-5, 2, 30, 20]}, "outside"),
    ({**GOOD, "boxes": [30, 2, 1, 20]}, "inverted"),
    ({**GOOD, "boxes": [1, 20, 30, 20]}, "inverted or empty"),
    ({**GOOD, "boxes": [1, 2, 30]}, "four finite numbers"),
    ({**GOOD, "instruction": "  "}, "empty instruction"),
])
def test_bad_processed_rows(tmp_path, bad, message):
    png(tmp_path, "a.png")
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    lines = [GOOD, bad, {**GOOD, "instruction": ["one", "two"]}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    with pytest.raises(BadRowError, match=f"train.jsonl, row 1: .*{message}"):
        make(data_path=str(tmp_path)).rows("train")
    with pytest.warns(UserWarning, match="kept 2 of 3 rows, skipped 1"):
        rows = make(data_path=str(tmp_path), on_bad_row="skip").rows("train")
    assert [r["instruction"] for r in rows] == ["the dark thing", "one", "two"]
    assert rows[0]["box"] == [1.0, 2.0, 30.0, 20.0] and rows[0]["image_size"] == [40, 30]


def test_box_a_pixel_past_the_border_is_clipped(tmp_path):
    png(tmp_path, "a.png")
    (tmp_path / "train.json").write_text(json.dumps([{**GOOD, "boxes": [-0.5, 0, 40.5, 30]}]))
    assert make(data_path=str(tmp_path)).rows("train")[0]["box"] == [0.0, 0.0, 40.0, 30.0]


def test_empty_split(tmp_path):
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(BadRowError, match="no usable rows"):
        make(data_path=str(tmp_path)).rows("test")
    with pytest.raises(FileNotFoundError, match="no train.json"):
        make(data_path=str(tmp_path)).rows("train")


def raw_split(tmp_path: Path) -> Path:
    folder = tmp_path / "train"
    folder.mkdir()
    square = [[1, 1], [20, 1], [20, 20], [1, 20]]
    for name, shapes in [("good", [{"label": "ignore", "points": [[0, 0], [5, 0], [5, 5]]},
                                   {"label": "target", "points": square}]),
                         ("outside", [{"label": "target", "points": [[1, 1], [90, 1], [90, 20]]}]),
                         ("noimage", [{"label": "target", "points": square}])]:
        if name != "noimage":
            png(folder, f"{name}.jpg")
        (folder / f"{name}.json").write_text(json.dumps({"text": ["what to find"], "shapes": shapes}))
    (folder / "broken.json").write_text("{not json")
    png(folder, "broken.png")
    return folder


def test_bad_raw_reasonseg_files(tmp_path):
    folder = raw_split(tmp_path)
    with pytest.raises(BadRowError, match=r"broken.json: annotation is not JSON"):
        make(data_path=str(tmp_path)).rows("train")
    task = make(data_path=str(tmp_path), on_bad_row="skip")
    with pytest.warns(UserWarning, match="kept 1 of 4 rows, skipped 3"):
        (row,) = task.rows("train")
    assert task.skipped_rows("train") == 3
    assert row["box"] == [1.0, 1.0, 20.0, 20.0]  # the "ignore" polygon is passed over
    (folder / "broken.json").unlink()
    with pytest.raises(BadRowError, match=r"noimage.json: no image"):
        make(data_path=str(tmp_path)).rows("train")
    (folder / "noimage.json").unlink()
    with pytest.raises(BadRowError, match=r"outside.json: box .* outside the 40x30 image"):
        make(data_path=str(tmp_path)).rows("train")


def test_tiny_preset_trains(tmp_path, train_preset):
    records = train_preset("lisa_tiny", tmp_path)
    assert any("eval/iou" in r for r in records) and any("reward/accuracy" in r for r in records)


def test_bundled_sample_is_what_make_samples_writes(tmp_path):
    cls = type(make())
    cls.make_samples(tmp_path)
    for name in ("train.jsonl", "test.jsonl", "reasonseg/train/train_03.json"):
        assert (tmp_path / name).read_text() == (SAMPLE / name).read_text()
