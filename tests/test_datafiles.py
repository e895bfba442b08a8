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
