"""Benchmark evaluation of a checkpoint on a task's test split(s): `gpg-vl eval`.

    load the task's rows per split -> batches of items (batch j on process j % world) ->
    generate k completions per item -> score with the task's own reward, parse with its own
    `answer` -> one record per item, appended as each batch ends -> merged in order ->
    the paper's metrics (gpg_vl/eval_metrics.py) -> summary.json and table.md

The prompt, the images, the answer parsing and the score are the task's (no second copy).
Each process holds the whole model (no ZeRO sharding), so processes never wait on one
another until the end. A batch's items and its sampling seed depend only on its position,
so a resumed run, or a run over another number of processes, writes the same records.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from gpg_vl.eval_metrics import TOTAL, comparison_table, decode_rle, giou_ciou, mask_overlap, part_columns, \
    read_masks, summary_columns
from gpg_vl.rewards import REWARD_TIMEOUT_S
from gpg_vl.scoring import Score, score_completions
from gpg_vl.task import DEFAULT_MAX_IMAGE_PIXELS, Row, ScoreContext, Task, TaskConfig, build_task

ITEMS, SUMMARY, TABLE, SETTINGS = "items.jsonl", "summary.json", "table.md", "settings.json"
RANK_ITEMS = "items.rank{}.jsonl"
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Settings that change no record: the others must match when a run continues in the same folder.
NOT_RESUME_KEYS = ("output_dir", "name", "pred_masks", "reward_workers")


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message says what to change."""


@dataclass
class EvalSettings:
    task: str
    """Registered task name, or a path to a plugin file."""
    model: str
    """Checkpoint: a Hugging Face folder (a run's checkpoints/step_N or its hf/ folder) or a hub name."""
    output_dir: str = ""
    """Folder for items.jsonl, summary.json and table.md; empty = runs/eval/<task>/<model path with _ for />."""
    name: str = ""
    """The model's row label in tables; empty = the model path."""
    data_path: str = ""
    """Data file or folder (or hub name) holding the split(s); empty = the task's bundled sample."""
    benchmarks: dict[str, str] = field(default_factory=dict)
    """A suite of data sets, NAME=PATH each (repeat --data): every one evaluated on the split(s), reported side by side with their average (the math benchmarks)."""
    splits: list[str] = field(default_factory=lambda: ["test"])
    """Splits to evaluate, comma-separated (lisa: test,val)."""
    image_root: str = ""
    """Folder that image paths in the data are relative to; empty = the data file's folder."""
    on_bad_row: str = "error"
    """An unusable data row: error (stop, naming it) or skip (drop and report the count)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Task options KEY=VALUE (YAML values; repeat --option), as task.options in training."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Largest image (width x height) a row may have; a larger one is a bad row (a guard against decompression bombs)."""
    reward_timeout_s: float = REWARD_TIMEOUT_S
    """Seconds one completion's reward may take; one that runs longer scores 0 and is flagged failed."""
    reward_workers: int = 2
    """Processes that score a batch's completions side by side; 0 = in this process (only symbolic checks time-limited)."""
    samples: int = 1
    """k completions per item: the first gives pass@1; k > 1 also reports mean@k (needs --temperature > 0)."""
    temperature: float = 0.0
    """0 = greedy decoding; above 0, sampling at this temperature (the paper's math evaluation: 0.6)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (with --temperature > 0)."""
    top_k: int = 0
    """Top-k sampling, 0 = off (with --temperature > 0)."""
    max_new_tokens: int = 1024
    """Longest completion; a longer one is cut and scored as it stands."""
    batch_size: int = 8
    """Items per generate call on each process (k completions each)."""
    limit: int = 0
    """Evaluate only the first N items of each split; 0 = all."""
    seed: int = 0
    """Seed of sampling; each batch is seeded from it and the batch's position."""
    dtype: str = "auto"
    """Weights dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16."""
    max_pixels: int = 0
    """Largest image area after resizing (vision models); 0 = what the run that trained the checkpoint used (its config.yaml), else 401408."""
    min_pixels: int = 0
    """Smallest image area after resizing (vision models); 0 = what the run that trained the checkpoint used, else 3136."""
    pred_masks: str = ""
    """JSON file {item id: COCO RLE mask} from a segmenter prompted with the predicted boxes: adds gIoU and cIoU (lisa on the raw ReasonSeg layout, whose polygons give the gold masks)."""

    def check(self) -> None:
        """Refuse settings that cannot be honoured, or that would do nothing."""
        bounds = (("samples", 1), ("max_new_tokens", 1), ("batch_size", 1), ("limit", 0), ("top_k", 0))
        for key, low in bounds:
            if getattr(self, key) < low:
                raise EvalError(f"{key} must be at least {low}, got {getattr(self, key)}")
        if not self.temperature >= 0 or not 0 < self.top_p <= 1:
            raise EvalError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature} and {self.top_p}")
        if self.temperature == 0 and (self.samples > 1 or self.top_p < 1 or self.top_k):
            raise EvalError("greedy decoding (temperature 0) gives one answer per item: set --temperature > 0 "
                            "for --samples > 1, --top-p or --top-k")
        if self.benchmarks and self.data_path:
            raise EvalError("give either --data-path or --data NAME=PATH (a suite), not both")
        if not self.splits or not all(self.splits):
            raise EvalError(f"no split to evaluate in {self.splits!r}")
        if self.dtype not in DTYPES:
            raise EvalError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.on_bad_row not in ("error", "skip"):
            raise EvalError(f"on_bad_row must be error or skip, got {self.on_bad_row!r}")
        if self.max_image_pixels < 1 or not self.reward_timeout_s > 0 or self.reward_workers < 0:
            raise EvalError("need max_image_pixels >= 1, reward_timeout_s > 0 and reward_workers >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def output(self) -> Path:
        return Path(self.output_dir or f"runs/eval/{self.task}/{self.model.strip('/').replace('/', '_')}")


class Part(NamedTuple):
    """One evaluated split of one data set."""

    name: str
    split: str
    data: str
    task: Task
    rows: list[Row]


# ---------------------------------------------------------------- data and model


def load_parts(s: EvalSettings) -> list[Part]:
    """Every (data set, split) to evaluate, its rows read and limited; a missing split or file
    stops here with a message naming it."""
    sources = s.benchmarks or {"": s.data_path}
    parts = []
    for bench, data in sources.items():
        if data:
            check_local(data, "data path", "a data file or folder, or a hub name owner/data_set")
        for split in s.splits:
            name = split if not bench else bench if len(s.splits) == 1 else f"{bench}/{split}"
            config = TaskConfig(name=s.task, data_path=data, image_root=s.image_root, on_bad_row=s.on_bad_row,
                                eval_split=split, eval_size=0, max_image_pixels=s.max_image_pixels,
                                reward_timeout_s=s.reward_timeout_s, reward_workers=s.reward_workers,
                                options=dict(s.options))
            try:
                task = build_task(config)
            except ValueError as err:  # a bad task option: the task's message says which
                raise EvalError(str(err)) from err
            if task.metric_component not in task.reward_components:
                raise EvalError(f"{s.task}: metric_component {task.metric_component!r} is not one of its reward "
                                f"components {task.reward_components}")
            try:
                rows = list(task.rows(split))
            except (FileNotFoundError, KeyError, ValueError) as err:
                where = data or "the bundled sample"
                if data and not Path(data).expanduser().exists():
                    where += " (no such local path here, so it was tried as a hub name)"
                raise EvalError(f"{s.task}: cannot read split {split!r} of {where}: {err}") from err
            parts.append(Part(name, split, data, task, rows[:s.limit] if s.limit else rows))
    return parts


def check_local(path: str, what: str, expected: str) -> None:
    """A path that cannot be a hub name (owner/name) must exist here: a clear error now, rather
    than a failed hub lookup."""
    if not Path(path).expanduser().exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise EvalError(f"{what} not found: {path} (give {expected})")


def model_path(path: str) -> str:
    """A training checkpoint folder stands for its hf/ model."""
    check_local(path, "model path", "a checkpoint folder or a hub name owner/model")
    local = Path(path).expanduser()
    if (local / "hf" / "config.json").is_file() and not (local / "config.json").is_file():
        return str(local / "hf")
    return path


def pixel_limits(s: EvalSettings) -> tuple[int, int]:
    """(min_pixels, max_pixels): as given, else as the gpg-vl run that trained the checkpoint
    set them (a model evaluated at other sizes than it learned on sees other visual tokens),
    else the paper's 3136 and 401408."""
    trained: dict[str, Any] = {}
    local = Path(s.model).expanduser().resolve()
    folders = [local, *local.parents][:4] if local.is_dir() else []  # step_N/hf, step_N, checkpoints, the run
    for folder in folders:
        if (folder / "config.yaml").is_file():
            import yaml

            run = yaml.safe_load((folder / "config.yaml").read_text()) or {}
            if isinstance(run, dict) and {"model", "train"} <= run.keys():  # a gpg-vl run's config
                trained = run["model"] or {}
                break
    return (s.min_pixels or int(trained.get("min_pixels", 3136)),
            s.max_pixels or int(trained.get("max_pixels", 401408)))


def load_model(s: EvalSettings, device: torch.device):
    from gpg_vl.models import load_adapter

    dtype = s.dtype if s.dtype != "auto" else "bfloat16" if device.type == "cuda" else "float32"
    path = model_path(s.model)
    try:
        min_pixels, max_pixels = pixel_limits(s)
        adapter = load_adapter(path, dtype=dtype, max_pixels=max_pixels, min_pixels=min_pixels)
    except (OSError, ValueError) as err:
        raise EvalError(f"cannot load model {s.model!r}: {err}") from err
    adapter.model.to(device).eval()
    return adapter


# ---------------------------------------------------------------- records and resume


def item_record(part: Part, index: int, row: Row, prompt: str, texts: list[str], scored: list[Score],
                ctx: ScoreContext) -> dict[str, Any]:
    """Everything about one item: its prompt as the model read it, each completion, the answer
    the task parsed from it and its score components (`scored`, one per completion, as
    Task.safe_score gives them). A reward or parser that raises, or a reward that overran its
    time limit, scores 0 and is flagged in `failed`, never dropped."""
    task = part.task
    scores, failed, answers = [], [], []
    for text, (components, ok) in zip(texts, scored):
        try:
            answer = task.answer(text, row, ctx)
        except Exception:  # a parser failure is a recorded wrong answer, as a reward failure is
            answer, ok = None, False
            components = {k: 0.0 for k in task.reward_components}
        scores.append(components)
        failed.append(not ok)
        answers.append(answer)
    record = {"part": part.name, "index": index, "id": str(row.get("id", f"{part.name}-{index}")),
              "prompt": prompt, "completions": texts, "answers": answers,
              "scores": scores, "failed": failed}
    if task.metric_group:
        record["group"] = str(row.get(task.metric_group, ""))
    return record


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


def resume_settings(s: EvalSettings) -> dict[str, Any]:
    return {k: v for k, v in asdict(s).items() if k not in NOT_RESUME_KEYS}


def check_resumable(out: Path, s: EvalSettings) -> None:
    """A folder holding records of other settings is refused (their records would mix)."""
    path = out / SETTINGS
    if not path.is_file():
        if (out / ITEMS).is_file():
            raise EvalError(f"{out} holds items.jsonl but no settings.json: choose another --output")
        return
    before, now = json.loads(path.read_text(encoding="utf-8")), resume_settings(s)
    changed = [f"{k}: {before.get(k)!r} then, {now[k]!r} now" for k in now if before.get(k) != now[k]]
    if changed:
        raise EvalError(f"{out} holds an evaluation with other settings ({'; '.join(changed)}): choose another "
                        f"--output, or delete the folder to start again")


# ---------------------------------------------------------------- the run


def batches(n_rows: int, batch_size: int, rank: int, world: int) -> list[range]:
    """This process's batches: batch j (items j*B .. j*B+B-1) runs on process j % world."""
    return [range(j * batch_size, min(n_rows, (j + 1) * batch_size))
            for j in range(rank, math.ceil(n_rows / batch_size), world)]


def run_batch(s: EvalSettings, adapter, ctx: ScoreContext, part: Part, items: range) -> list[dict]:
    from gpg_vl.rollout import HFEngine, SamplingSettings, encode_rows, rollout

    if not s.greedy:  # seeded by position: the same samples however the run was split or resumed
        torch.manual_seed(zlib.crc32(f"{s.seed}/{part.name}/{items.start}".encode()))
    rows = [part.rows[i] for i in items]
    sampling = SamplingSettings(s.max_new_tokens, s.greedy, s.temperature or 1.0, s.top_p, s.top_k)
    prompts = encode_rows(adapter, part.task, rows)
    out = rollout(HFEngine(adapter), adapter, rows, prompts, s.samples, sampling)
    k = s.samples
    scored = score_completions(part.task, out.texts, [row for row in rows for _ in range(k)], ctx)
    return [item_record(part, i, row, prompt.text, out.texts[n * k:(n + 1) * k], scored[n * k:(n + 1) * k], ctx)
            for n, (i, row, prompt) in enumerate(zip(items, rows, prompts))]


def generate_missing(s: EvalSettings, parts: list[Part], adapter, done: set, rank: int, world: int,
                     out: Path, show: bool) -> None:
    """Evaluate this process's batches that still miss an item, appending records as each ends."""
    from tqdm.auto import tqdm

    ctx = ScoreContext(boxes=adapter.box_convention)
    todo = [(p, b) for p in parts for b in batches(len(p.rows), s.batch_size, rank, world)
            if any((p.name, i) not in done for i in b)]
    bar = tqdm(total=sum(len(b) for _, b in todo), unit="item", disable=not show, dynamic_ncols=True)
    with (out / RANK_ITEMS.format(rank)).open("a", encoding="utf-8") as f:
        for part, items in todo:
            bar.set_description(f"{s.task} {part.name}")
            records = [r for r in run_batch(s, adapter, ctx, part, items) if (part.name, r["index"]) not in done]
            f.write("".join(json.dumps(r, default=str) + "\n" for r in records))
            f.flush()
            bar.update(len(items))
    bar.close()


def evaluate(s: EvalSettings) -> dict[str, Any] | None:
    """Run (or finish) the evaluation; the summary on the main process, None on the others."""
    from accelerate import Accelerator

    s.check()
    acc = Accelerator()
    out = s.output()
    parts = load_parts(s)
    masks = read_masks(s.pred_masks) if s.pred_masks else None
    check_resumable(out, s)
    adapter = load_model(s, acc.device)
    acc.wait_for_everyone()
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / SETTINGS).write_text(json.dumps(resume_settings(s), indent=1) + "\n", encoding="utf-8")
        consolidate(out, parts)
    acc.wait_for_everyone()
    done = set(read_records(out))
    generate_missing(s, parts, adapter, done, acc.process_index, acc.num_processes, out, acc.is_main_process)
    acc.wait_for_everyone()
    summary = None
    if acc.is_main_process:
        summary = summarize(s, parts, consolidate(out, parts), masks)
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


def part_summary(s: EvalSettings, part: Part, records: list[dict], masks: dict[str, Any] | None) -> dict[str, Any]:
    task = part.task
    metrics = part_columns(records, task.metric_component, task.metric_label, bool(task.metric_group), s.samples)
    summary = {"name": part.name, "split": part.split, "data": part.data or "bundled sample", "items": len(records),
               "completions": len(records) * s.samples, "metrics": metrics,
               "headline": TOTAL if task.metric_group else task.metric_label,
               "reward_means": {c: sum(x[c] for r in records for x in r["scores"]) / (len(records) * s.samples)
                                for c in task.reward_components},
               "failed": sum(sum(r["failed"]) for r in records),
               "skipped_rows": task.skipped_rows(part.split),  # bad rows dropped at load (on_bad_row=skip)
               "no_answer": sum(a is None for r in records for a in r["answers"])}
    if masks is not None:
        extra, summary["masks_missing"] = mask_columns(part, records, masks)
        metrics.update(extra)
    return summary


def summarize(s: EvalSettings, parts: list[Part], records: dict[tuple[str, int], dict],
              masks: dict[str, Any] | None) -> dict[str, Any]:
    per_part = []
    for part in parts:
        items = [records.get((part.name, i)) for i in range(len(part.rows))]
        if None in items:  # cannot happen unless a process died: say so rather than report a subset
            raise EvalError(f"{part.name}: {items.count(None)} items have no record; run the same command again")
        per_part.append(part_summary(s, part, items, masks))
    columns, headline = summary_columns(per_part, suite=bool(s.benchmarks))
    return {"task": s.task, "name": s.name or s.model, "model": s.model, "settings": asdict(s),
            "parts": per_part, "columns": columns, "headline": headline}


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
