"""`gpg-vl eval`: a checkpoint on the evaluated task's split(s), every row, with the paper's metrics.

    the config (a preset, a training run's config.yaml, flags) -> the evaluated task's rows per
    split and data set -> batches (batch j on process j % world) -> gpg_vl.evaluation's
    evaluate_batch, records appended as each batch ends -> merged in order -> split_metrics
    (plus gIoU/cIoU from predicted masks) -> summary.json and table.md

Each process holds the whole model (no ZeRO sharding), so processes never wait on one
another until the end. A batch's items and its sampling seed depend only on its position,
so a resumed run, or a run over another number of processes, writes the same records.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpg_vl.checkpoint import list_checkpoints
from gpg_vl.config import Config, to_dict
from gpg_vl.eval_metrics import TOTAL, comparison_table, decode_rle, giou_ciou, mask_overlap, read_masks, \
    summary_columns
from gpg_vl.evaluation import Decoding, EvalError, Part, batches, decoding, evaluate_batch, evaluated_task_config, \
    load_part, reward_means, split_metrics
from gpg_vl.resources import model_location
from gpg_vl.task import ScoreContext

ITEMS, SUMMARY, TABLE, SETTINGS = "items.jsonl", "summary.json", "table.md", "settings.json"
RANK_ITEMS = "items.rank{}.jsonl"
RESUME_TASK_KEYS = ("data_config", "data_revision", "on_bad_row", "max_image_pixels", "reward_timeout_s")
RESUME_EVAL_SKIP = ("output_dir", "name", "pred_masks")  # settings that change no record


# ---------------------------------------------------------------- what is evaluated


def evaluated_model(cfg: Config, config_file: str | Path | None = None) -> str:
    """eval.model; else the newest checkpoint of the run the config comes from (the folder of
    a run's config.yaml, or train.output_dir); else model.path."""
    if cfg.eval.model:
        return cfg.eval.model
    for folder in ([Path(config_file).parent] if config_file else []) + [Path(cfg.train.output_dir)]:
        found = list_checkpoints(folder)
        if found:
            return str(found[-1])
    return cfg.model.path


def load_parts(cfg: Config) -> list[Part]:
    """Every (data set, split) to evaluate, its rows read and limited; a missing split or file
    stops here with a message naming it."""
    e = cfg.eval
    if not e.splits:
        raise EvalError("no split to evaluate: give --split (eval.splits), or task.eval_split")
    if e.benchmarks and e.data_path:
        raise EvalError("give either --data-path or --data NAME=PATH (a suite), not both")
    parts = []
    for bench, data in (e.benchmarks or {"": e.data_path}).items():
        if data:
            check_local(data, "data path", "a data file or folder, or a hub name owner/data_set")
        for split in e.splits:
            name = split if not bench else bench if len(e.splits) == 1 else f"{bench}/{split}"
            parts.append(load_part(evaluated_task_config(cfg, data), split, name, e.limit))
    return parts


def check_local(path: str, what: str, expected: str) -> None:
    """A path that cannot be a hub name (owner/name) must exist here: a clear error now, rather
    than a failed hub lookup."""
    if not Path(path).expanduser().exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise EvalError(f"{what} not found: {path} (give {expected})")


def model_path(path: str) -> str:
    """A training checkpoint folder stands for its hf/ model; tiny:<family> for a bundled model."""
    path = model_location(path)
    check_local(path, "model path", "a checkpoint folder or a hub name owner/model")
    local = Path(path).expanduser()
    if (local / "hf" / "config.json").is_file() and not (local / "config.json").is_file():
        return str(local / "hf")
    return path


def trained_pixel_limits(model: str) -> dict[str, int]:
    """model.min_pixels and model.max_pixels of the gpg-vl run that trained a local checkpoint
    (a model evaluated at other sizes than it learned on sees other visual tokens); none for
    other checkpoints."""
    import yaml

    local = Path(model).expanduser().resolve()
    for folder in ([local, *local.parents][:4] if local.is_dir() else []):  # step_N/hf, step_N, checkpoints, run
        run = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").is_file() else None
        if isinstance(run, dict) and {"model", "train"} <= run.keys():  # a gpg-vl run's config
            return {k: int(v) for k, v in (run["model"] or {}).items() if k in ("min_pixels", "max_pixels")}
    return {}


def load_model(cfg: Config, device: torch.device):
    from gpg_vl.models import load_adapter

    m = cfg.model
    dtype = m.dtype if m.dtype != "auto" else "bfloat16" if device.type == "cuda" else "float32"
    try:
        adapter = load_adapter(model_path(cfg.eval.model), dtype=dtype, max_pixels=m.max_pixels,
                               min_pixels=m.min_pixels, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as err:
        raise EvalError(f"cannot load model {cfg.eval.model!r}: {err}") from err
    adapter.model.to(device).eval()
    return adapter


def output_folder(cfg: Config) -> Path:
    e = cfg.eval
    return Path(e.output_dir or f"runs/eval/{e.task}/{e.model.strip('/').replace('/', '_').replace(':', '_')}")


# ---------------------------------------------------------------- records and resume


def read_records(out: Path) -> dict[tuple[str, int], dict]:
    """Records already written in `out` (merged and per-process files), by (part, index); a
    line cut short by an interruption is ignored (its item is evaluated again)."""
    found: dict[tuple[str, int], dict] = {}
    for path in [out / ITEMS, *sorted(out.glob(RANK_ITEMS.format("*")))]:
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and {"part", "index", "scores"} <= record.keys():
                    found.setdefault((record["part"], record["index"]), record)
    return found


def consolidate(out: Path, parts: list[Part]) -> dict[tuple[str, int], dict]:
    """Merge every record into items.jsonl, in part then item order, and drop the per-process files."""
    records = read_records(out)
    order = {p.name: n for n, p in enumerate(parts)}
    kept = sorted((k for k in records if k[0] in order and k[1] < len(parts[order[k[0]]].rows)),
                  key=lambda k: (order[k[0]], k[1]))
    tmp = out / (ITEMS + ".tmp")
    tmp.write_text("".join(json.dumps(records[k], default=str) + "\n" for k in kept), encoding="utf-8")
    tmp.replace(out / ITEMS)
    for path in out.glob(RANK_ITEMS.format("*")):
        path.unlink()
    return {k: records[k] for k in kept}


def resume_settings(cfg: Config) -> dict[str, Any]:
    """What the records depend on, as dotted keys: the model evaluated and its image sizes,
    the evaluated task and data, the decoding (settings.json holds them)."""
    e = {f"eval.{k}": v for k, v in dataclasses.asdict(cfg.eval).items() if k not in RESUME_EVAL_SKIP}
    m = {f"model.{k}": getattr(cfg.model, k) for k in ("dtype", "max_pixels", "min_pixels")}
    t = {f"task.{k}": getattr(cfg.task, k) for k in RESUME_TASK_KEYS}
    return {**e, **m, **t}


def check_resumable(out: Path, cfg: Config) -> None:
    """A folder holding records of other settings is refused (their records would mix)."""
    path = out / SETTINGS
    if not path.is_file():
        if (out / ITEMS).is_file():
            raise EvalError(f"{out} holds items.jsonl but no settings.json: choose another --output")
        return
    before, now = json.loads(path.read_text(encoding="utf-8")), resume_settings(cfg)
    changed = [f"{k}: {before.get(k)!r} then, {now[k]!r} now" for k in now if before.get(k) != now[k]]
    if changed:
        raise EvalError(f"{out} holds an evaluation with other settings ({'; '.join(changed)}): choose another "
                        f"--output, or delete the folder to start again")


# ---------------------------------------------------------------- the run


def generate_missing(parts: list[Part], adapter, dec: Decoding, done: set, rank: int, world: int, out: Path,
                     show: bool) -> None:
    """Evaluate this process's batches that still miss an item, appending records as each ends."""
    from tqdm.auto import tqdm

    from gpg_vl.rollout import HFEngine

    engine, ctx = HFEngine(adapter), ScoreContext(boxes=adapter.box_convention)
    todo = [(p, b) for p in parts for b in batches(len(p.rows), dec.batch_size, rank, world)
            if any((p.name, i) not in done for i in b)]
    bar = tqdm(total=sum(len(b) for _, b in todo), unit="item", disable=not show, dynamic_ncols=True)
    with (out / RANK_ITEMS.format(rank)).open("a", encoding="utf-8") as f:
        for part, items in todo:
            bar.set_description(f"{part.task.name} {part.name}")
            records = [r for r in evaluate_batch(part, items, engine, adapter, ctx, dec)
                       if (part.name, r["index"]) not in done]
            f.write("".join(json.dumps(r, default=str) + "\n" for r in records))
            f.flush()
            bar.update(len(items))
    bar.close()


def evaluate(cfg: Config) -> dict[str, Any] | None:
    """Run (or finish) the evaluation of eval.model (set it, or see `evaluated_model`); the
    summary on the main process, None on the others."""
    from accelerate import Accelerator

    acc = Accelerator()
    cfg.eval.model = cfg.eval.model or cfg.model.path
    out = output_folder(cfg)
    parts = load_parts(cfg)
    masks = read_masks(cfg.eval.pred_masks) if cfg.eval.pred_masks else None
    check_resumable(out, cfg)
    adapter = load_model(cfg, acc.device)
    acc.wait_for_everyone()
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / SETTINGS).write_text(json.dumps(resume_settings(cfg), indent=1) + "\n", encoding="utf-8")
        consolidate(out, parts)
    acc.wait_for_everyone()
    dec = decoding(cfg)
    generate_missing(parts, adapter, dec, set(read_records(out)), acc.process_index, acc.num_processes, out,
                     acc.is_main_process)
    acc.wait_for_everyone()
    summary = None
    if acc.is_main_process:
        summary = summarize(cfg, parts, consolidate(out, parts), masks)
        (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        (out / TABLE).write_text(comparison_table([summary]), encoding="utf-8")
    acc.wait_for_everyone()
    return summary


# ---------------------------------------------------------------- the summary


def mask_columns(part: Part, records: list[dict], masks: dict[str, Any]) -> tuple[dict[str, float], int]:
    """gIoU and cIoU of the predicted masks against the task's gold masks, and how many items
    had no predicted mask (each counted as an empty mask: IoU 0)."""
    overlaps, missing = [], 0
    for row, record in zip(part.rows, records):
        rle = masks.get(record["id"])
        missing += rle is None
        try:
            gold = part.task.gold_mask(row)
            if gold is None:
                raise ValueError("no gold mask: gIoU/cIoU need data with polygons (lisa: the raw ReasonSeg "
                                 "folder as --data-path)")
            overlaps.append(mask_overlap(np.zeros_like(gold) if rle is None else decode_rle(rle), gold))
        except ValueError as err:
            raise EvalError(f"item {record['id']} of {part.name}: {err}") from err
    return giou_ciou(overlaps), missing


def part_summary(part: Part, records: list[dict], samples: int, masks: dict[str, Any] | None) -> dict[str, Any]:
    task = part.task
    metrics = split_metrics(task, records, samples)
    summary = {"name": part.name, "split": part.split, "data": part.data or "bundled sample", "items": len(records),
               "completions": len(records) * samples, "metrics": metrics,
               "headline": TOTAL if task.metric_group else task.metric_label,
               "reward_means": reward_means(task, records),
               "failed": sum(sum(r["failed"]) for r in records),
               "skipped_rows": task.skipped_rows(part.split),  # bad rows dropped at load (on_bad_row=skip)
               "no_answer": sum(a is None for r in records for a in r["answers"])}
    if masks is not None:
        extra, summary["masks_missing"] = mask_columns(part, records, masks)
        metrics.update(extra)
    return summary


def summarize(cfg: Config, parts: list[Part], records: dict[tuple[str, int], dict],
              masks: dict[str, Any] | None) -> dict[str, Any]:
    per_part = []
    for part in parts:
        items = [records.get((part.name, i)) for i in range(len(part.rows))]
        if None in items:  # cannot happen unless a process died: say so rather than report a subset
            raise EvalError(f"{part.name}: {items.count(None)} items have no record; run the same command again")
        per_part.append(part_summary(part, items, cfg.eval.samples, masks))
    columns, headline = summary_columns(per_part, suite=bool(cfg.eval.benchmarks))
    return {"task": cfg.eval.task, "name": cfg.eval.name or cfg.eval.model, "model": cfg.eval.model,
            "settings": to_dict(cfg), "parts": per_part, "columns": columns, "headline": headline}


def read_summary(path: str | Path) -> dict[str, Any]:
    """A summary.json, given as the file or as the evaluation's output folder."""
    path = Path(path).expanduser()
    path = path / SUMMARY if path.is_dir() else path
    if not path.is_file():
        raise EvalError(f"summary not found: {path} (give a summary.json or an evaluation's output folder)")
    summary = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(summary, dict) or not {"task", "name", "columns", "headline"} <= summary.keys():
        raise EvalError(f"{path} is not a summary written by gpg-vl eval")
    return summary


def merge_summaries(paths: list[str], names: list[str] | None) -> str:
    """The comparison table of several evaluations (base, GRPO, GPG; one task or several)."""
    try:
        return comparison_table([read_summary(p) for p in paths], names)
    except ValueError as err:
        raise EvalError(str(err)) from err
