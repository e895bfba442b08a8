"""The 4-shot classification tasks (flower102, pets37, fgvc_aircraft, cars196): prompts, the
reward on golden completions (exploits included), class lists, loaders and the tiny presets."""

import io
import json
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gpg_vl.boxes import PixelBoxes
from gpg_vl.config import load_config
from gpg_vl.datafiles import BadRowError
from gpg_vl.task import ScoreContext, TaskConfig, build_task, get_task_class, task_names
from gpg_vl.resources import PRESETS
from gpg_vl.samples import CLASSES as SAMPLE_CLASSES

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["flower102", "pets37", "fgvc_aircraft", "cars196"]
CTX = ScoreContext(PixelBoxes())
# The reference's instruction, copied here by hand so that a change to the plugin's shows.
INSTRUCTION = ("Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
               "The output answer format should be as follows:\n<think> ... </think> <answer>species name</answer>\n"
               "Please strictly follow the format.")
QUESTIONS = {
    "flower102": "This is an image containing a plant. Please identify the species of the plant based on the image.",
    "pets37": "This is an image containing a pet. Please identify the species of the pet based on the image.",
    "fgvc_aircraft": "This is an image containing an aircraft. "
                     "Please identify the model of the aircraft based on the image.",
    "cars196": "This is an image containing a car. Please identify the model of the car based on the image.",
}


def make(name="flower102", **options):
    return build_task(TaskConfig(name=name, options=options))


def done(answer, think="The petals are pink."):
    return f"<think>{think}</think> <answer>{answer}</answer>"


@pytest.fixture(scope="module")
def flowers():
    return make()


def gold_row(task, answer):
    return next(r for r in task.rows("test") if r["answer"] == answer)


# ------------------------------------------------------------------ registry and prompts


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_reference_prompt(name):
    assert name in task_names() and get_task_class(name).name == name
    task = make(name)
    for row in task.rows("train") + task.rows("test"):
        (message,) = task.prompt(row)
        assert message["role"] == "user" and [c["type"] for c in message["content"]] == ["image", "text"]
        assert message["content"][1]["text"] == QUESTIONS[name] + "\n" + INSTRUCTION
        assert [im.size for im in task.images(row)] == [(64, 64)]


def test_prompt_uses_the_rows_problem(flowers):
    row = dict(flowers.rows("test")[0])

    def text(r):
        return flowers.prompt(r)[0]["content"][1]["text"]

    row["problem"] = "Which flower? Output in <think> </think> and <answer> </answer> tags."
    assert text(row) == row["problem"]  # a full prompt is used as written
    row["problem"] = "Which flower is this?"
    assert text(row) == "Which flower is this?\n" + INSTRUCTION
    row["problem"] = ""
    assert text(row) == QUESTIONS["flower102"] + "\n" + INSTRUCTION


# ------------------------------------------------------------------ bundled sample


@pytest.mark.parametrize("name", NAMES)
def test_sample_rows(name):
    task = make(name)
    classes = list(SAMPLE_CLASSES[get_task_class(name)])
    assert task.classes == classes and 6 <= len(classes) <= 10
    train, test = task.rows("train"), task.rows("test")
    assert len(train) == 2 * len(classes) and len(test) == len(classes)
    assert sorted(r["answer"] for r in train) == sorted(classes * 2)
    assert sorted(r["answer"] for r in test) == sorted(classes)
    assert all(Path(r["image"]).is_file() for r in train + test)
    assert task.rows("train") is train  # cached


def test_sample_images_differ_by_class_and_shot(flowers):
    images = [flowers.images(r)[0].tobytes() for r in flowers.rows("train") + flowers.rows("test")]
    assert len(set(images)) == len(images)


# ------------------------------------------------------------------ reward: golden completions

GOLDEN = [
    # (completion, gold, accuracy, format)
    (done("pink primrose"), "pink primrose", 1, 1),
    (done("Pink_Primrose"), "pink primrose", 1, 1),  # case and underscores ignored, as the reference did
    (done("  PINK   PRIMROSE  "), "pink primrose", 1, 1),
    (done("pinkprimrose"), "pink primrose", 1, 1),
    (done("Hard leaved pocket orchid"), "hard-leaved pocket orchid", 1, 1),  # hyphen = space
    (done("desert rose"), "desert-rose", 1, 1),
    (done("It is a pink primrose."), "pink primrose", 1, 1),  # one class named in a phrase
    (done("pink primrose 🌸"), "pink primrose", 1, 1),
    (done("ｐｉｎｋ ｐｒｉｍｒｏｓｅ"), "pink primrose", 1, 1),  # full-width letters (NFKC)
    (done("sweet pea"), "pink primrose", 0, 1),  # wrong class
    (done("pink"), "pink primrose", 0, 1),  # partly right: the reference scored 1 ("pink" in the label)
    (done("primrose"), "pink primrose", 0, 1),  # not a class (reference: 1)
    (done("rose"), "desert-rose", 0, 1),  # another class nested in the gold (reference: 1)
    (done("desert-rose"), "rose", 0, 1),  # the gold nested in another class (reference: 1)
    (done("roses"), "rose", 0, 1),  # a class name must be whole words
    (done("primroses and roses everywhere"), "rose", 0, 1),
    # the known exploits (Visual-RFT issues 79, 176) and their kin
    (done(""), "pink primrose", 0, 1),  # empty answer: the reference scored 1
    (done("   "), "pink primrose", 0, 1),
    (done("pink primrose or sweet pea"), "pink primrose", 0, 1),  # hedging: reference 1
    (done("pink primrose, sweet pea"), "pink primrose", 0, 1),
    (done("not a rose but a pink primrose"), "pink primrose", 0, 1),
    (done(", ".join(SAMPLE_CLASSES[get_task_class("flower102")])), "rose", 0, 1),
    (done("pink primrose, pink primrose"), "pink primrose", 1, 1),  # one class, said twice
    # outside the tags: the reference matched the whole completion then
    ("pink primrose", "pink primrose", 0, 0),
    ("<think>pink primrose</think>", "pink primrose", 0, 0),
    ("<think>x</think> pink primrose", "pink primrose", 0, 0),
    ("<think>x</think> <answer>pink primrose", "pink primrose", 0, 0),
    ("<answer>pink primrose</answer>", "pink primrose", 1, 0),  # right, no think: accuracy only
    ("<answer>pink primrose</answer><think>x</think>", "pink primrose", 1, 0),
    ("<think>x</think><answer>sweet pea</answer><answer>pink primrose</answer>", "pink primrose", 1, 1),  # last
    ("", "pink primrose", 0, 0),
    (done("报春花"), "pink primrose", 0, 1),
    ("\x00<answer>\ud800</answer>", "pink primrose", 0, 0),
]


@pytest.mark.parametrize("completion,gold,accuracy,fmt", GOLDEN)
def test_golden_completions(flowers, completion, gold, accuracy, fmt):
    assert flowers.score(completion, gold_row(flowers, gold), CTX) == {"accuracy": accuracy, "format": fmt}


@pytest.mark.parametrize("name,right,hedge", [
    ("pets37", "Staffordshire_Bull_Terrier", "staffordshire bull terrier or american pit bull terrier"),
    ("fgvc_aircraft", "Boeing 737-300", "737-300, 737-200"),
    ("cars196", "am general hummer suv 2000", "AM General Hummer SUV 2000 or Acura RL Sedan 2012"),
])
def test_golden_other_tasks(name, right, hedge):
    task = make(name)
    gold = {"pets37": "staffordshire bull terrier", "fgvc_aircraft": "737-300",
            "cars196": "AM General Hummer SUV 2000"}[name]
    row = gold_row(task, gold)
    assert task.score(done(right), row, CTX) == {"accuracy": 1.0, "format": 1.0}
    assert task.score(done(hedge), row, CTX)["accuracy"] == 0
    assert task.score(done(""), row, CTX)["accuracy"] == 0
    assert task.score(done(" or ".join(task.classes)), row, CTX)["accuracy"] == 0


def test_fgvc_variants_are_not_prefixes_of_each_other():
    task = make("fgvc_aircraft")
    row = gold_row(task, "737-200")
    assert task.score(done("737-2000"), row, CTX)["accuracy"] == 0
    assert task.score(done("737 200"), row, CTX)["accuracy"] == 1
    assert task.score(done("737"), row, CTX)["accuracy"] == 0  # the reference scored 1 (a substring)


def test_very_long_completions_are_scored_fast(flowers):
    row = gold_row(flowers, "pink primrose")
    cases = [
        (done("a" * 100_000), 0, 1),
        (done("x " * 50_000 + "pink primrose"), 1, 1),
        ("<think>" + "pink primrose rose " * 5_000 + "</think><answer>pink primrose</answer>", 1, 1),
        (done("rose " * 20_000), 0, 1),
        ("<answer>" * 50_000 + "pink primrose</answer>", 1, 0),
        ("</think><answer>" * 30_000, 0, 0),
    ]
    start = time.perf_counter()
    for completion, accuracy, fmt in cases:
        assert flowers.score(completion, row, CTX) == {"accuracy": accuracy, "format": fmt}
    assert time.perf_counter() - start < 2.0


def test_score_never_raises(flowers):
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "pink", " primrose", "rose", "-", "_", " ", ",",
              " or ", "\n", "é", "🌸", "\\", "(", "[", "*", "?", "desert"]
    row = gold_row(flowers, "rose")
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        got = flowers.score(text, row, CTX)
        assert set(got) == {"accuracy", "format"} and all(v in (0.0, 1.0) for v in got.values())


# ------------------------------------------------------------------ class lists and options


def write_folder(folder, rows, split="train", classes=None, images=("a.png", "b.png")):
    """A local data folder: `images` as small PNGs, the rows as <split>.jsonl, classes.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in images:
        Image.new("RGB", (32, 32), (200, 40, 40)).save(folder / name)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if classes is not None:
        (folder / "classes.txt").write_text("\n".join(classes) + "\n")
    return folder


def local(folder, on_bad_row="error", name="flower102", **options):
    return build_task(TaskConfig(name=name, data_path=str(folder), on_bad_row=on_bad_row, options=options))


def row(image="a.png", answer="pink primrose", **extra):
    return {"image": image, "problem": "Which flower?", "solution": f"<answer>{answer}</answer>", **extra}


def test_classes_file_option(tmp_path):
    folder = write_folder(tmp_path / "d", [row(), row("b.png", "Sweet Pea")], classes=["x"])
    (tmp_path / "names.json").write_text(json.dumps(["pink primrose", "sweet pea", "tiger lily"]))
    task = local(folder, classes_file=str(tmp_path / "names.json"))  # wins over classes.txt
    assert task.classes == ["pink primrose", "sweet pea", "tiger lily"]
    assert [r["answer"] for r in task.rows("train")] == ["pink primrose", "sweet pea"]  # the list's spelling
    (tmp_path / "names.txt").write_text("pink primrose\n\n  sweet pea  \n")
    assert local(folder, classes_file=str(tmp_path / "names.txt")).classes == ["pink primrose", "sweet pea"]


def test_classes_derived_from_training_answers(tmp_path):
    rows = [row(), row("b.png", "Sweet_Pea"), row("a.png", "Pink Primrose"), row("b.png", "sweet pea")]
    folder = write_folder(tmp_path / "d", rows)
    task = local(folder)
    assert task.classes == ["pink primrose", "Sweet_Pea"]  # first spelling of each class
    assert [r["answer"] for r in task.rows("train")] == ["pink primrose", "Sweet_Pea", "pink primrose", "Sweet_Pea"]
    assert task.score(done("sweet pea"), task.rows("train")[1], CTX)["accuracy"] == 1
    write_folder(folder, [row("a.png", "tiger lily")], split="test")
    with pytest.raises(BadRowError, match=r"test\.jsonl, row 0: answer 'tiger lily' is not in the class list"):
        task.rows("test")


@pytest.mark.parametrize("options,error,message", [
    ({"class_file": "x.txt"}, ValueError, "did you mean classes_file"),
    ({"classes": ["a"]}, ValueError, "unknown option 'classes'.*known: classes_file"),
    ({"classes_file": ["a"]}, ValueError, "classes_file must be a string"),
    ({"classes_file": "/nonexistent/classes.txt"}, FileNotFoundError, "class list not found"),
])
def test_bad_options(options, error, message):
    with pytest.raises(error, match=message):
        make(**options)


@pytest.mark.parametrize("content,message", [
    ("Pink Primrose\npink_primrose\n", "'Pink Primrose' and 'pink_primrose' are the same"),
    ("\n  \n", "the list of choices is empty"),
    ("rose\n- _\n", "empty once spaces"),
])
def test_bad_class_lists(tmp_path, content, message):
    (tmp_path / "c.txt").write_text(content)
    with pytest.raises(ValueError, match=message):
        make(classes_file=str(tmp_path / "c.txt"))
    (tmp_path / "c.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="JSON list"):
        make(classes_file=str(tmp_path / "c.json"))


# ------------------------------------------------------------------ bad rows

CLASSES = ["pink primrose", "sweet pea"]
BAD_ROWS = [
    ({"image": "a.png", "problem": "q"}, "missing field 'solution'"),
    ({"problem": "q", "solution": "<answer>sweet pea</answer>"}, "missing field 'image'"),
    (row("missing.png"), "image not found"),
    (row("corrupt.png"), "unreadable image"),
    (row(answer=""), "empty answer"),
    (row(answer=" _ "), "empty answer"),
    (row(answer="tiger lily"), "not in the class list"),
    (row(problem=7), "problem must be a string"),
    ({"image": "a.png", "solution": 3}, "solution must be a string"),
]


@pytest.mark.parametrize("bad,reason", BAD_ROWS)
def test_bad_row_named_or_skipped(tmp_path, bad, reason):
    folder = write_folder(tmp_path / "d", [row(), bad, row("b.png", "sweet pea")], classes=CLASSES)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(BadRowError, match=rf"train\.jsonl, row 1: .*{reason}"):
        local(folder).rows("train")
    with pytest.warns(UserWarning, match="kept 2 of 3 rows, skipped 1 bad rows"):
        rows = local(folder, on_bad_row="skip").rows("train")
    assert [r["answer"] for r in rows] == CLASSES


def test_row_that_is_not_json(tmp_path):
    folder = write_folder(tmp_path / "d", [row()], classes=CLASSES)
    with (folder / "train.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(BadRowError, match=r"row 1: line 2 is not JSON"):
        local(folder).rows("train")


def test_empty_and_missing_splits(tmp_path):
    folder = write_folder(tmp_path / "d", [], classes=CLASSES)
    with pytest.raises(BadRowError, match="no usable rows in split 'train'"):
        local(folder).rows("train")
    with pytest.raises(FileNotFoundError, match="no test.json"):
        local(folder).rows("test")
    folder = write_folder(tmp_path / "e", [row(answer="tiger lily")], classes=CLASSES)
    with pytest.raises(BadRowError, match=r"no usable rows.*skipped 1 bad rows"):
        local(folder, on_bad_row="skip").rows("train")


def test_parquet_rows_with_image_bytes(tmp_path):
    """The hub's parquet layout: the image as {"bytes", "path"}; rows keep the bytes, not a file."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(buffer, format="PNG")
    table = pa.table({"image": [{"bytes": buffer.getvalue(), "path": None}], "problem": ["q"],
                      "solution": ["<answer> Sweet Pea </answer>"]})
    folder = tmp_path / "p"
    folder.mkdir()
    pq.write_table(table, folder / "train.parquet")
    task = local(folder)
    (r,) = task.rows("train")
    assert r["answer"] == "Sweet Pea" and task.images(r)[0].size == (40, 30)


def test_image_root_option(tmp_path):
    folder = write_folder(tmp_path / "d", [row()], classes=CLASSES, images=())
    write_folder(tmp_path / "pics", [], images=("a.png",))
    task = build_task(TaskConfig(name="flower102", data_path=str(folder), image_root=str(tmp_path / "pics")))
    assert task.images(task.rows("train")[0])[0].size == (32, 32)


# ------------------------------------------------------------------ presets


@pytest.mark.parametrize("name,epochs", [("flower102", 8), ("pets37", 24), ("fgvc_aircraft", 8), ("cars196", 8)])
def test_paper_presets(name, epochs):
    path = PRESETS / f"{name}.yaml"
    cfg = load_config(path)
    assert (cfg.model.path, cfg.task.name, cfg.train.epochs) == ("Qwen/Qwen2-VL-2B-Instruct", name, epochs)
    assert cfg.task.data_path.startswith("laolao77/ViRFT_CLS_")
    assert (cfg.algorithm.group_size, cfg.train.prompts_per_device, cfg.train.grad_accum) == (8, 1, 2)
    assert (cfg.train.learning_rate, cfg.train.lr_schedule, cfg.rollout.max_new_tokens) == (1e-6, "linear", 256)
    assert (cfg.model.max_pixels, cfg.model.min_pixels, cfg.algorithm.beta_th) == (401408, 3136, 0.4)
    text = path.read_text()
    assert "# launcher: zero3" in text and f"bash scripts/run_task.sh {name}" in text
