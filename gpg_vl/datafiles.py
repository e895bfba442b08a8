"""Rows of public data sets, from local files or a hub, with bad rows named or counted.

Every task reads its data through here, so that the same rules hold everywhere:

- a local file (`.json` holding a list, or a mapping of split name to list; `.jsonl`;
  `.parquet`) or a folder holding `<split>.json|.jsonl|.parquet`; images are paths
  relative to an image folder (by default the data file's own folder);
- or a hub name (`owner/name`), read with the `datasets` library when it is installed and
  the hub is reachable: the same rows, the same conversion;
- a row that cannot be used (a missing field, a missing or unreadable image, a box outside
  the image) raises `BadRowError` naming the file and the row, or, with
  `on_bad_row: skip`, is dropped and counted; the count is reported once per split.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image, UnidentifiedImageError

from gpg_vl.task import Row, Task

SUFFIXES = (".json", ".jsonl", ".parquet")


class BadRowError(ValueError):
    """A data row that cannot be used; the message names the file and the row."""


@dataclass
class LoadReport:
    """How many rows of a split were read, kept and skipped, and why (a few examples)."""

    source: str
    read: int = 0
    kept: int = 0
    left_out: int = 0  # by the task's own rules (convert returned None), not bad
    skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"{self.source}: kept {self.kept} of {self.read} rows"
        if self.left_out:
            text += f", left out {self.left_out} by the task's rules"
        if self.skipped:
            text += f", skipped {self.skipped} bad rows (e.g. {'; '.join(self.examples)})"
        return text


def split_file(path: Path, split: str) -> Path:
    """The file of `split`: `path` itself, or `path/<split>.<json|jsonl|parquet>`."""
    if path.is_file():
        return path
    if path.is_dir():
        for suffix in SUFFIXES:
            if (path / f"{split}{suffix}").is_file():
                return path / f"{split}{suffix}"
        raise FileNotFoundError(f"no {split}.json, {split}.jsonl or {split}.parquet in {path}")
    raise FileNotFoundError(f"data path not found: {path}")


def read_records(path: Path, split: str) -> Iterator[dict[str, Any]]:
    """The raw records of a local file, in file order."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        yield {"__error__": f"line {n} is not JSON ({err.msg})"}
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            if split not in data:
                raise FileNotFoundError(f"{path} has no split {split!r}; it has {', '.join(data)}")
            data = data[split]
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a list of rows or a mapping of split name to rows")
        yield from data
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):  # a few rows in memory at a time
            yield from batch.to_pylist()
    else:
        raise ValueError(f"{path}: unsupported data file; use one of {', '.join(SUFFIXES)}")


def read_hub(name: str, split: str) -> Iterator[dict[str, Any]]:
    """The records of a hub data set's split (needs `datasets` and a reachable hub)."""
    try:
        import datasets
    except ImportError as err:
        raise FileNotFoundError(f"{name!r} is not a local path, and reading it from the hub needs the "
                                f"`datasets` package (pip install datasets)") from err
    try:
        data = datasets.load_dataset(name, split=split)
        for column, feature in data.features.items():
            if isinstance(feature, datasets.Image):  # keep the compressed bytes; open_image decodes
                data = data.cast_column(column, datasets.Image(decode=False))
        yield from data
    except Exception as err:  # offline, unknown name, unknown split: all end here
        raise FileNotFoundError(f"cannot read split {split!r} of {name!r} from the hub ({err}); "
                                f"download it and give the local folder as the data path") from err


def open_image(value: Any, image_root: Path | None) -> Image.Image:
    """A record's image: a path (relative to `image_root`), a datasets image dict
    ({"bytes", "path"}) or a PIL image. Decoded fully, so a corrupt file fails here."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        else:
            rel = value.get("path") if isinstance(value, dict) else value
            if not isinstance(rel, str) or not rel:
                raise BadRowError(f"no image path in {value!r}")
            path = Path(rel) if image_root is None else image_root / rel
            if not path.is_file():
                raise BadRowError(f"image not found: {path}")
            image = Image.open(path)
        image.load()
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise BadRowError(f"unreadable image {value if isinstance(value, str) else ''}: {err}") from err


def image_size(value: Any) -> tuple[int, int]:
    """(width, height) of a record's image as `open_image` takes it, read from the header only."""
    if isinstance(value, Image.Image):
        return value.size
    source = io.BytesIO(value["bytes"]) if isinstance(value, dict) and value.get("bytes") else (
        value.get("path") if isinstance(value, dict) else value)
    with Image.open(source) as image:
        return image.size


class ImageRowTask(Task):
    """A task whose rows keep one image under "image" (a path or {"bytes"} checked at load),
    opened again each time it is shown."""

    def images(self, row: Row) -> list[Image.Image]:
        return [open_image(row["image"], None)]

    def image_sizes(self, row: Row) -> list[tuple[int, int]]:
        return [image_size(row["image"])]


def load_rows(data_path: str, split: str, convert: Callable[[dict[str, Any], Path | None], Row | None],
              on_bad_row: str = "error", image_root: str = "",
              max_rows: int = 0) -> tuple[list[Row], LoadReport]:
    """Rows of `split` from a local path or a hub name, each made by `convert(record, image_root)`,
    which raises BadRowError (or KeyError for a missing field) on a row it cannot use, and may
    return None for a row the task leaves out by design (not counted as bad). Reading stops
    once `max_rows` rows are kept (0 = read everything)."""
    local = Path(data_path).expanduser()
    if local.exists():
        file = split_file(local, split)
        records, source = read_records(file, split), str(file)
        root = Path(image_root).expanduser() if image_root else file.parent
    else:
        records, source = read_hub(data_path, split), f"{data_path} [{split}]"
        root = Path(image_root).expanduser() if image_root else None
    report, rows = LoadReport(source), []
    for index, record in enumerate(records):
        report.read += 1
        try:
            if not isinstance(record, dict) or "__error__" in record:
                raise BadRowError(record.get("__error__", "not a mapping") if isinstance(record, dict)
                                  else f"not a mapping: {record!r:.80}")
            row = convert(record, root)
            if row is None:
                report.left_out += 1
            else:
                rows.append(row)
        except (BadRowError, KeyError, TypeError, ValueError) as err:
            reason = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            if on_bad_row != "skip":
                raise BadRowError(f"{source}, row {index}: {reason} (set task.on_bad_row=skip to drop such rows)") from err
            report.skipped += 1
            if len(report.examples) < 3:
                report.examples.append(f"row {index}: {reason}")
        if max_rows and len(rows) >= max_rows:
            break
    report.kept = len(rows)
    if not rows:
        raise BadRowError(f"{source}: no usable rows in split {split!r} ({report})")
    if report.skipped:
        warnings.warn(str(report), stacklevel=2)
    return rows, report
