"""The benchmark metrics of `gpg-vl eval`, as pure functions of the per-item records, and the
markdown tables of one evaluation or of several merged into the paper's comparison.

Every metric is a fraction in [0, 1] (the same numbers as a training run's `eval/*`); the
tables print them in percent, as the paper reports them. A record holds, per item, the score
components of each of its k completions (`scores`, first completion first) and, for a task
with a `metric_group`, the item's `group` value.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

MASK_IGNORE = 255  # gold-mask pixels left out of gIoU and cIoU
TOTAL = "Total"
AVERAGE = "average"
MISSING = "–"


def mean(values: Sequence[float]) -> float:
    """The mean; 0 for no values."""
    return sum(values) / len(values) if values else 0.0


def part_columns(records: list[dict], component: str, label: str, grouped: bool, samples: int) -> dict[str, float]:
    """The metric columns of one evaluated split.

    `label`: the mean of `component` over the items' first completions (pass@1 of one sample
    per item, the paper's protocol). With `grouped`, one column per group value instead, in
    order of first appearance, then their sample-weighted total (the mean over all items). With
    k = `samples` > 1 completions per item, also `mean@k`: the mean over all k completions (the
    unbiased estimate of pass@1, steadier on 30 or 40 problems)."""
    first = [r["scores"][0][component] for r in records]
    if grouped:
        groups: dict[str, list[float]] = {}
        for record, value in zip(records, first):
            groups.setdefault(record["group"], []).append(value)
        columns = {name: mean(values) for name, values in groups.items()}
        columns[TOTAL] = mean(first)
    else:
        columns = {label: mean(first)}
    if samples > 1:
        columns[f"mean@{samples}"] = mean([s[component] for r in records for s in r["scores"]])
    return columns


# ---------------------------------------------------------------- masks


def mask_overlap(pred: np.ndarray, gold: np.ndarray) -> tuple[int, int]:
    """(intersection, union) in pixels of a predicted mask (nonzero = object) and a gold mask
    (1 = object, MASK_IGNORE = left out, as LISA's evaluation leaves ReasonSeg's ignore regions)."""
    if pred.shape != gold.shape:
        raise ValueError(f"predicted mask is {pred.shape[1]}x{pred.shape[0]} (WxH) but the image is "
                         f"{gold.shape[1]}x{gold.shape[0]}")
    kept = gold != MASK_IGNORE
    p, g = (pred != 0) & kept, gold == 1
    return int((p & g).sum()), int((p | g).sum())


def giou_ciou(overlaps: Sequence[tuple[int, int]]) -> dict[str, float]:
    """gIoU: the mean of per-item mask IoU (an item with an empty union, no object and none
    predicted, scores 1, as in LISA's evaluation); cIoU: cumulative intersection over cumulative
    union (1 when both are 0)."""
    per_item = [i / u if u else 1.0 for i, u in overlaps]
    inter, union = sum(i for i, _ in overlaps), sum(u for _, u in overlaps)
    return {"gIoU": mean(per_item), "cIoU": inter / union if union else 1.0}


def _coco():
    try:
        from pycocotools import mask as coco
    except ImportError as err:
        raise ImportError("RLE masks need pycocotools: pip install -e '.[eval]'") from err
    return coco


def decode_rle(rle: Any) -> np.ndarray:
    """A COCO run-length-encoded mask {"size": [h, w], "counts": str or list} as uint8 [h, w]."""
    coco = _coco()
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"a mask must be a COCO RLE {{'size': [h, w], 'counts': ...}}, got {rle!r:.80}")
    try:
        h, w = (int(v) for v in rle["size"])
        if isinstance(rle["counts"], list):  # uncompressed RLE
            rle = coco.frPyObjects(rle, h, w)
        elif isinstance(rle["counts"], str):
            rle = {"size": [h, w], "counts": rle["counts"].encode("ascii")}
        with warnings.catch_warnings():  # pycocotools 2.0.10 under numpy 2: a deprecation of its own
            warnings.simplefilter("ignore", DeprecationWarning)
            return coco.decode(rle)
    except (TypeError, ValueError, UnicodeEncodeError) as err:
        raise ValueError(f"unreadable COCO RLE mask ({err})") from err


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """A binary mask [h, w] as a JSON-ready compressed COCO RLE."""
    rle = _coco().encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def read_masks(path: str | Path) -> dict[str, Any]:
    """{item id: RLE} from a JSON file mapping each item id to its predicted mask."""
    _coco()  # missing before the run, not after it
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object mapping item ids to COCO RLE masks")
    return data


# ---------------------------------------------------------------- tables


def summary_columns(parts: list[dict], suite: bool) -> tuple[dict[str, float], float]:
    """A summary's table row and its headline value. One split: its columns. Several: each
    column prefixed by the split's name; a suite of data sets (the math benchmarks) adds the
    average of each column they share. Headline: the suite's average, else the first split's."""
    if len(parts) == 1:
        return dict(parts[0]["metrics"]), parts[0]["metrics"][parts[0]["headline"]]
    columns = {f"{p['name']} {k}": v for p in parts for k, v in p["metrics"].items()}
    if not suite:
        return columns, parts[0]["metrics"][parts[0]["headline"]]
    shared = [k for k in parts[0]["metrics"] if all(k in p["metrics"] for p in parts)]
    for k in shared:
        columns[f"{AVERAGE} {k}"] = sum(p["metrics"][k] for p in parts) / len(parts)
    return columns, columns[f"{AVERAGE} {parts[0]['headline']}"]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def comparison_table(summaries: list[dict], names: Sequence[str] | None = None) -> str:
    """One markdown table of several evaluations: a row per model name (`names`, one per summary,
    else each summary's own name), the columns of each task; with several tasks, the columns
    are prefixed by the task and an average of the tasks' headline metrics closes the row (the
    paper's four classification sets and their average)."""
    if names is not None and len(names) != len(summaries):
        raise ValueError(f"{len(names)} names for {len(summaries)} summaries: give one name per summary")
    tasks = list(dict.fromkeys(s["task"] for s in summaries))
    rows: dict[str, dict[str, float]] = {}
    headlines: dict[str, dict[str, float]] = {}
    for i, s in enumerate(summaries):
        name = names[i] if names is not None else s["name"]
        if s["task"] in headlines.setdefault(name, {}):
            raise ValueError(f"two summaries of task {s['task']!r} for {name!r}: evaluate several splits in one "
                             f"run (--split test,val) or give them different names (--names)")
        headlines[name][s["task"]] = s["headline"]
        for column, value in s["columns"].items():
            label = column if len(tasks) == 1 else s["task"] if len(s["columns"]) == 1 else f"{s['task']} {column}"
            rows.setdefault(name, {})[label] = value
    header = list(dict.fromkeys(label for cells in rows.values() for label in cells))
    if len(tasks) > 1:
        header.append(AVERAGE)
        for name, cells in rows.items():
            if len(headlines[name]) == len(tasks):
                cells[AVERAGE] = sum(headlines[name].values()) / len(tasks)
    # Percent, as the paper's tables.
    body = [[name] + [f"{100 * cells[h]:.2f}" if h in cells else MISSING for h in header] for name, cells in rows.items()]
    return markdown(["model"] + header, body)
