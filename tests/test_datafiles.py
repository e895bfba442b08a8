"""The shared row loader: local formats, hub fallback message, bad rows named or counted."""

import json

import pytest
from PIL import Image

from gpg_vl.datafiles import BadRowError, load_rows, open_image


def convert(record, root):
    if not str(record["answer"]).strip():
        raise BadRowError("empty answer")
    open_image(record["image"], root)
    return {"image": str(root / record["image"]), "answer": record["answer"]}


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    return tmp_path


GOOD = {"image": "a.png", "answer": "red"}


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_each_local_format(folder, suffix):
    rows = [GOOD, {"image": "a.png", "answer": "blue"}]
    path = folder / f"train{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    got, report = load_rows(str(folder), "train", convert)  # the folder: <split>.<ext> is found
    assert [r["answer"] for r in got] == ["red", "blue"] and report.kept == 2


def test_json_mapping_of_splits(folder):
    (folder / "all.json").write_text(json.dumps({"train": [GOOD], "test": [GOOD, GOOD]}))
    assert len(load_rows(str(folder / "all.json"), "test", convert)[0]) == 2
    with pytest.raises(FileNotFoundError, match="no split 'val'"):
        load_rows(str(folder / "all.json"), "val", convert)


BAD = [
    ({"image": "a.png"}, "missing field 'answer'"),
    ({"image": "nope.png", "answer": "red"}, "image not found"),
    ({"image": "broken.png", "answer": "red"}, "unreadable image"),
    ({"image": "a.png", "answer": " "}, "empty answer"),
]


@pytest.mark.parametrize("bad,reason", BAD)
def test_a_bad_row_stops_with_file_and_row(folder, bad, reason):
    (folder / "train.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(BadRowError) as err:
        load_rows(str(folder), "train", convert)
    assert "train.jsonl, row 1" in str(err.value) and reason in str(err.value)


def test_skip_drops_and_counts(folder):
    lines = [json.dumps(GOOD)] + [json.dumps(bad) for bad, _ in BAD] + ["{not json"]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="skipped 5 bad rows"):
        rows, report = load_rows(str(folder), "train", convert, on_bad_row="skip")
    assert len(rows) == 1 and (report.read, report.kept, report.skipped) == (6, 1, 5)


def test_an_empty_split_is_an_error(folder):
    (folder / "train.jsonl").write_text("")
    with pytest.raises(BadRowError, match="no usable rows"):
        load_rows(str(folder), "train", convert)


def test_no_hub_gives_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="give the local folder"):
        load_rows("someone/not-a-local-path", "train", convert)


def test_image_root_option(folder, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    (data / "train.json").write_text(json.dumps([GOOD]))
    assert load_rows(str(data), "train", convert, image_root=str(folder))[0][0]["answer"] == "red"


# ---------------------------------------------------------------- bad images, encodings, depth: both policies


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost no pixel data (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def bad_image_folder(folder):
    Image.new("RGB", (600, 2)).save(folder / "wide.png")  # 300:1
    (folder / "bomb.png").write_bytes(png_header(15000, 15000))
    whole = (folder / "a.png").read_bytes()
    (folder / "cut.png").write_bytes(whole[:len(whole) // 2])
    return folder


BAD_IMAGES = [("wide.png", "aspect ratio of at most 200:1"),
              ("bomb.png", "15000 x 15000 = 225,000,000 pixels is over the cap of 89,478,485"),
              ("cut.png", "unreadable image")]


@pytest.mark.parametrize("name,reason", BAD_IMAGES)
def test_a_bad_image_is_named_with_its_file_and_row(folder, name, reason):
    bad_image_folder(folder)
    (folder / "train.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps({"image": name, "answer": "x"}) + "\n")
    with pytest.raises(BadRowError, match="train.jsonl, row 1: ") as err:
        load_rows(str(folder), "train", convert)
    assert reason in str(err.value)


def test_bad_images_are_skipped_and_counted(folder):
    bad_image_folder(folder)
    lines = [GOOD] + [{"image": name, "answer": "x"} for name, _ in BAD_IMAGES]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.warns(UserWarning, match="skipped 3 bad rows"):
        rows, report = load_rows(str(folder), "train", convert, on_bad_row="skip")
    assert (report.read, report.kept, report.skipped) == (4, 1, 3)


@pytest.mark.parametrize("size", [(200, 1), (201, 1), (1, 201), (199, 1), (400, 2), (401, 2)])
def test_the_aspect_ratio_rule_is_the_processors_own(tmp_path, size):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    Image.new("RGB", size).save(tmp_path / "x.png")
    try:
        smart_resize(size[1], size[0])
        accepted = True
    except ValueError:
        accepted = False
    if accepted:
        assert open_image("x.png", tmp_path).size == size
    else:
        with pytest.raises(BadRowError, match="too elongated"):
            open_image("x.png", tmp_path)


def test_the_pixel_cap_is_a_setting(folder):
    (folder / "train.jsonl").write_text(json.dumps(GOOD) + "\n")  # a.png is 8 x 8 = 64 pixels
    assert load_rows(str(folder), "train", convert, max_image_pixels=64)[1].kept == 1
    with pytest.raises(BadRowError, match="8 x 8 = 64 pixels is over the cap of 63"):
        load_rows(str(folder), "train", convert, max_image_pixels=63)
    (folder / "bomb.png").write_bytes(png_header(15000, 15000))
    # A cap above PIL's own limit is honoured: the file then fails only for its missing pixels.
    with pytest.raises(BadRowError, match="unreadable image bomb.png: OSError"):
        open_image("bomb.png", folder, max_pixels=300_000_000)


def latin1_files(folder):
    """A JSON-lines and a JSON file with one row written in Latin-1 ("bl\xe9" = "blé")."""
    good, bad = json.dumps(GOOD).encode(), json.dumps({"image": "a.png", "answer": "blé"}).encode("latin-1", "replace")
    bad = bad.replace(b"\\u00e9", "é".encode("latin-1"))  # json.dumps escaped it: put the raw byte back
    assert b"\xe9" in bad
    (folder / "train.jsonl").write_bytes(good + b"\n" + bad + b"\n" + good + b"\n")
    (folder / "test.json").write_bytes(b"[" + good + b", " + bad + b", " + good + b"]")


@pytest.mark.parametrize("split,where", [("train", "train.jsonl, row 1: line 2 is not UTF-8 text"),
                                         ("test", "test.json, row 1: holds text that is not UTF-8")])
def test_text_in_another_encoding_is_a_bad_row(folder, split, where):
    latin1_files(folder)
    with pytest.raises(BadRowError) as err:
        load_rows(str(folder), split, convert)
    assert where in str(err.value) and "\\xe9" not in str(err.value) and "\xe9" not in str(err.value)
    with pytest.warns(UserWarning, match="kept 2 of 3 rows, skipped 1"):
        rows, report = load_rows(str(folder), split, convert, on_bad_row="skip")
    assert [r["answer"] for r in rows] == ["red", "red"]


def test_byte_order_marks(folder):
    (folder / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert load_rows(str(folder), "train", convert)[1].kept == 1  # UTF-8 with a BOM is UTF-8
    (folder / "train.jsonl").write_bytes((json.dumps(GOOD) + "\n").encode("utf-16"))
    with pytest.raises(BadRowError, match="train.jsonl is UTF-16 text: save it as UTF-8"):
        load_rows(str(folder), "train", convert, on_bad_row="skip")


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize("levels,reason", [(5000, "line 2 nests deeper than Python's JSON parser allows"),
                                           (150, "nests deeper than 100 levels")])
def test_over_deep_json_is_a_bad_row(folder, levels, reason):
    lines = [json.dumps(GOOD), '{"image": "a.png", "answer": "x", "extra": ' + deep(levels) + "}", json.dumps(GOOD)]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRowError, match=f"train.jsonl, row 1: {reason}"):
        load_rows(str(folder), "train", convert)
    with pytest.warns(UserWarning, match="skipped 1 bad rows"):
        assert load_rows(str(folder), "train", convert, on_bad_row="skip")[1].kept == 2


def test_an_over_deep_json_file_is_named(folder):
    (folder / "train.json").write_text("[" + json.dumps(GOOD) + ", " + deep(5000) + "]")
    for policy in ("error", "skip"):  # the file cannot be parsed, so no row of it can be kept
        with pytest.raises(BadRowError, match="train.json: a value nests deeper .* JSON lines"):
            load_rows(str(folder), "train", convert, on_bad_row=policy)


def test_messages_never_hold_a_rows_bytes(folder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    junk = b"junk, no image " * 500
    pq.write_table(pa.Table.from_pylist([{"image": junk, "answer": "red"}]), folder / "train.parquet")
    with pytest.raises(BadRowError) as err:
        load_rows(str(folder), "train", convert)
    assert "unreadable image" in str(err.value) and "junk" not in str(err.value)
    assert len(str(err.value)) < 300
    (folder / "test.jsonl").write_text(json.dumps(["a list", "not a row"]) + "\n")
    with pytest.raises(BadRowError, match="row 0: not a mapping but list of length 2"):
        load_rows(str(folder), "test", convert)
