"""Rows of public data sets, from local files or a hub, with bad rows named or counted.

Every task reads its data through here, so that the same rules hold everywhere:

- a local file (`.json` holding a list, or a mapping of split name to list; `.jsonl`;
  `.parquet`) or a folder holding `<split>.json|.jsonl|.parquet`; images are paths
  relative to an image folder (by default the data file's own folder);
- or a hub name (`owner/name`), read with the `datasets` library when it is installed and
  the hub is reachable: the same rows, the same conversion;
- a row that cannot be used raises `BadRowError` naming the file and the row, or, with
  `on_bad_row: skip`, is dropped and counted; the count is reported once per split and kept
  in the task's `load_reports` (what `Task.skipped_rows` reads). Unusable are: a missing
  field, text that is not UTF-8, a JSON line nested deeper than Python's parser allows (or
  a row deeper than MAX_DEPTH), a missing, undecodable or truncated image, an image over the
  pixel cap (`task.max_image_pixels`, against decompression bombs) or with an aspect ratio
  the Qwen-VL processors refuse, and whatever the task's own `convert` rejects.

Messages name a row by its file and position and describe a bad value by its kind and size,
never by its bytes (an embedded image would flood the console).
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image

from gpg_vl.task import DEFAULT_MAX_IMAGE_PIXELS, Row, Task

SUFFIXES = (".json", ".jsonl", ".parquet")
MAX_ASPECT_RATIO = 200
"""Longer side over shorter side: Qwen2-VL's image processor (smart_resize, shared by Qwen2.5-VL
and Qwen3-VL) raises above 200, which would stop training at the image's first generation."""
MAX_DEPTH = 100
"""Nesting levels a row may have: no data set needs more, and a deeper row would overflow the
stack later, when it is copied to a reward worker or written to an evaluation record."""
_NOT_TEXT = re.compile("[\ud800-\udfff]")  # lone surrogates: undecodable bytes, or JSON escapes that are no text
_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
         b"\xfe\xff": "UTF-16"}
_UTF8_BOM = b"\xef\xbb\xbf"


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


def _text_start(data: bytes, path: Path) -> int:
    """Where the text of a data file starts: after a UTF-8 byte-order mark; a UTF-16 or UTF-32
    file is refused as a whole (no row of it can be read as UTF-8)."""
    for bom, name in _BOMS.items():
        if data.startswith(bom):
            raise BadRowError(f"{path} is {name} text: save it as UTF-8")
    return len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0


def _json_line(line: bytes, n: int) -> Any:
    """One record of a JSON-lines file, or an error record saying why it cannot be read."""
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        return {"__error__": f"line {n} is not UTF-8 text (an invalid byte at column {err.start + 1}): "
                             f"save the file as UTF-8"}
    except json.JSONDecodeError as err:
        return {"__error__": f"line {n} is not JSON ({err.msg})"}
    except RecursionError:
        return {"__error__": f"line {n} nests deeper than Python's JSON parser allows"}


def read_records(path: Path, split: str) -> Iterator[dict[str, Any]]:
    """The raw records of a local file, in file order. A record that cannot be read (a JSON
    line that does not parse) is yielded as {"__error__": why}, so that it is a bad row."""
    if path.suffix == ".jsonl":
        with path.open("rb") as f:  # bytes: an undecodable line is one bad row, not the end of the file
            for n, line in enumerate(f, 1):
                if n == 1:
                    line = line[_text_start(line, path):]
                if line.strip():
                    yield _json_line(line, n)
    elif path.suffix == ".json":
        data = path.read_bytes()
        # Undecodable bytes become lone surrogates, so that only the rows holding them are bad.
        text = data[_text_start(data, path):].decode("utf-8", errors="surrogateescape")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadRowError(f"{path} is not JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
        except RecursionError:
            raise BadRowError(f"{path}: a value nests deeper than Python's JSON parser allows; fix it, "
                              f"or write the rows as JSON lines (.jsonl), where such a row can be skipped") from None
        if isinstance(data, dict):
            if split not in data:
                raise FileNotFoundError(f"{path} has no split {split!r}; it has {', '.join(map(str, data))}")
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


def check_record(record: Any) -> None:
    """Refuse a record that is not a mapping, holds text that is not UTF-8 (or escapes that
    are no Unicode text), or nests deeper than MAX_DEPTH. Iterative: a deep row must not
    overflow the stack here either."""
    if not isinstance(record, dict):
        raise BadRowError(f"not a mapping but {describe(record)}")
    if "__error__" in record:
        raise BadRowError(record["__error__"])
    stack = [(record, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _NOT_TEXT.search(value):
                raise BadRowError("holds text that is not UTF-8: save the file as UTF-8")
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise BadRowError(f"nests deeper than {MAX_DEPTH} levels")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items)


def describe(value: Any) -> str:
    """A value by its kind and size, for a message: never its content (it may be an image)."""
    if isinstance(value, (bytes, bytearray, str, list, dict)):
        return f"{type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"


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


_PIXEL_CAP = contextvars.ContextVar("pixel_cap", default=DEFAULT_MAX_IMAGE_PIXELS)


@contextlib.contextmanager
def pixel_cap(max_pixels: int) -> Iterator[None]:
    """Images opened inside (by a task's `convert`, which is not given the settings) are held
    to `max_pixels`."""
    token = _PIXEL_CAP.set(max_pixels)
    try:
        yield
    finally:
        _PIXEL_CAP.reset(token)


def _open_header(value: Any, image_root: Path | None) -> Image.Image:
    """The image opened lazily (size known, pixels not decoded) from a path, bytes, a datasets
    image dict ({"bytes", "path"}) or a PIL image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray)) or (isinstance(value, dict) and value.get("bytes")):
        data = value if isinstance(value, (bytes, bytearray)) else value["bytes"]
        if not isinstance(data, (bytes, bytearray)):
            raise BadRowError(f"image bytes expected, got {describe(data)}")
        return Image.open(io.BytesIO(data))
    rel = value.get("path") if isinstance(value, dict) else value
    if not isinstance(rel, str) or not rel:
        raise BadRowError(f"no image path or bytes in {describe(value)}")
    path = Path(rel) if image_root is None else image_root / rel
    if not path.is_file():
        raise BadRowError(f"image not found: {path}")
    return Image.open(path)


@contextlib.contextmanager
def _cap_instead_of_pil_check():
    """PIL's own bomb check (a warning, or an error at twice its limit) is switched off: the
    task's cap (task.max_image_pixels) decides, and it may be set above PIL's limit."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def open_image(value: Any, image_root: Path | None, max_pixels: int | None = None) -> Image.Image:
    """A record's image (see `_open_header`) as RGB, checked: at most `max_pixels` pixels
    (default: the cap of the split being loaded, see `pixel_cap`), an aspect ratio of at most
    MAX_ASPECT_RATIO, then decoded fully, so that a corrupt or truncated file fails here."""
    cap = _PIXEL_CAP.get() if max_pixels is None else max_pixels
    where = f" {value}" if isinstance(value, str) else ""
    try:
        with _cap_instead_of_pil_check():
            image = _open_header(value, image_root)
        w, h = image.size
        if w * h > cap:
            raise BadRowError(f"image{where} of {w} x {h} = {w * h:,} pixels is over the cap of {cap:,} "
                              f"(task.max_image_pixels, a guard against decompression bombs)")
        if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
            raise BadRowError(f"image{where} of {w} x {h} is too elongated: the Qwen-VL image processors "
                              f"accept an aspect ratio of at most {MAX_ASPECT_RATIO}:1")
        image.load()
        return image.convert("RGB")
    except BadRowError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ... on bad files
        raise BadRowError(f"unreadable image{where}: {type(err).__name__}: {str(err)[:120]}") from err


def image_size(value: Any) -> tuple[int, int]:
    """(width, height) of a record's image as `open_image` takes it (checked at load), read from
    the header only."""
    with _cap_instead_of_pil_check():
        image = _open_header(value, None)
    size = image.size
    if not isinstance(value, Image.Image):
        image.close()
    return size


class ImageRowTask(Task):
    """A task whose rows keep one image under "image" (a path or {"bytes"} checked at load),
    opened again each time it is shown, under the same checks."""

    def images(self, row: Row) -> list[Image.Image]:
        return [open_image(row["image"], None, self.config.max_image_pixels)]

    def image_sizes(self, row: Row) -> list[tuple[int, int]]:
        return [image_size(row["image"])]


ROW_ERRORS = (BadRowError, KeyError, TypeError, ValueError, RecursionError)
"""What a `convert` may raise on a row it cannot use (UnicodeError is a ValueError)."""


def load_rows(data_path: str, split: str, convert: Callable[[dict[str, Any], Path | None], Row | None],
              on_bad_row: str = "error", image_root: str = "", max_rows: int = 0,
              max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[list[Row], LoadReport]:
    """Rows of `split` from a local path or a hub name, each made by `convert(record, image_root)`,
    which raises BadRowError (or KeyError for a missing field) on a row it cannot use, and may
    return None for a row the task leaves out by design (not counted as bad). Reading stops
    once `max_rows` rows are kept (0 = read everything). Images opened by `convert` are held
    to `max_image_pixels`."""
    local = Path(data_path).expanduser()
    if local.exists():
        file = split_file(local, split)
        records, source = read_records(file, split), str(file)
        root = Path(image_root).expanduser() if image_root else file.parent
    else:
        records, source = read_hub(data_path, split), f"{data_path} [{split}]"
        root = Path(image_root).expanduser() if image_root else None
    report, rows = LoadReport(source), []
    with pixel_cap(max_image_pixels):
        for index, record in enumerate(records):
            report.read += 1
            try:
                check_record(record)
                row = convert(record, root)
                if row is None:
                    report.left_out += 1
                else:
                    rows.append(row)
            except ROW_ERRORS as err:
                reason = f"missing field {err}" if isinstance(err, KeyError) else str(err)
                if on_bad_row != "skip":
                    raise BadRowError(f"{source}, row {index}: {reason} (set task.on_bad_row=skip to drop such "
                                      f"rows)") from err
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


def load_split(task: Task, data_path: str, split: str, convert: Callable[[dict[str, Any], Path | None], Row | None],
               max_rows: int = 0) -> list[Row]:
    """`load_rows` with the task's settings (on_bad_row, image_root, max_image_pixels); the
    report is kept in `task.load_reports[split]`, where `Task.skipped_rows` reads it."""
    c = task.config
    rows, task.load_reports[split] = load_rows(data_path, split, convert, c.on_bad_row, c.image_root, max_rows,
                                               c.max_image_pixels)
    return rows
