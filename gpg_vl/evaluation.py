"""The one evaluation: a task's rows through the current model, each completion scored by the
task's own reward and parsed by its own `answer`, the task's metric under its own name.

    rows of the evaluated task (eval.task: the training task, or another one such as cvbench)
      -> batches (batch j on process j % world) -> k completions per item (greedy by default)
      -> one record per item -> split_metrics: the task's metric_label (per metric_group value
         and their total for CV-Bench), mean@k, the mean of every reward component

Training's held-out evaluation (`held_out`, every few steps, on task.eval_size rows of
task.eval_split) and `gpg-vl eval` (gpg_vl/evaluate.py: every row, records on disk, resumable)
both run `evaluate_batch` and `split_metrics`, so a training curve and a benchmark table show
the same quantity under the same name. Metrics are fractions (tables print them in percent).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import torch

from gpg_vl.config import EVAL_DATA, Config
from gpg_vl.eval_metrics import part_columns
from gpg_vl.rollout import Engine, SamplingSettings, encode_rows, rollout
from gpg_vl.scoring import Score, score_completions
from gpg_vl.task import Row, ScoreContext, Task, TaskConfig, build_task


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message says what to change."""


class Part(NamedTuple):
    """One evaluated split of one data set."""

    name: str
    split: str
    data: str
    task: Task
    rows: list[Row]


class Decoding(NamedTuple):
    """How the items of an evaluation are answered."""

    sampling: SamplingSettings
    samples: int  # k completions per item
    batch_size: int  # items per generate call
    seed: int  # sampled evaluation: each batch is seeded from it and its position


def decoding(cfg: Config) -> Decoding:
    e = cfg.eval
    return Decoding(SamplingSettings(e.max_new_tokens, e.greedy, e.temperature or 1.0, e.top_p, e.top_k),
                    e.samples, e.batch_size, e.seed)


def evaluated_task_config(cfg: Config, data_path: str | None = None) -> TaskConfig:
    """The task evaluated: eval.task on its data (eval.data_path, or `data_path` for one data
    set of a suite), with the task section's bad-row, image and reward settings."""
    e = cfg.eval
    data = {key: getattr(e, key) for key in EVAL_DATA}
    if data_path is not None:
        data["data_path"] = data_path
    return dataclasses.replace(cfg.task, name=e.task, options=dict(e.options), **data)


def build_evaluated(config: TaskConfig) -> Task:
    try:
        return build_task(config)
    except ValueError as err:  # a bad task option: the task's message says which
        raise EvalError(str(err)) from err


def load_part(config: TaskConfig, split: str, name: str, limit: int, task: Task | None = None) -> Part:
    """A split of the evaluated task's data (of `task`, when given, else a task built from
    `config`), its first `limit` rows (0 = all); a missing split or path stops here naming it."""
    task = task or build_evaluated(config)
    if task.metric_component not in task.reward_components:
        raise EvalError(f"{config.name}: metric_component {task.metric_component!r} is not one of its reward "
                        f"components {task.reward_components}")
    try:
        rows = list(task.rows(split))
    except (FileNotFoundError, KeyError, ValueError) as err:
        where = config.data_path or "the bundled sample"
        if config.data_path and not Path(config.data_path).expanduser().exists():
            where += " (no such local path here, so it was tried as a hub name)"
        raise EvalError(f"{config.name}: cannot read split {split!r} of {where}: {err}") from err
    return Part(name, split, config.data_path, task, rows[:limit] if limit else rows)


def batches(n_rows: int, batch_size: int, rank: int, world: int) -> list[range]:
    """This process's batches: batch j (items j*B .. j*B+B-1) runs on process j % world."""
    return [range(j * batch_size, min(n_rows, (j + 1) * batch_size))
            for j in range(rank, math.ceil(n_rows / batch_size), world)]


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


def evaluate_batch(part: Part, items: range, engine: Engine, adapter, ctx: ScoreContext, dec: Decoding) -> list[dict]:
    """The records of one batch of items: k completions each, scored in the task's reward workers."""
    rows = [part.rows[i] for i in items]
    prompts = encode_rows(adapter, part.task, rows)
    k, device = dec.samples, next(adapter.model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # training's stream goes on
        if not dec.sampling.greedy:  # seeded by position: the same samples however the run was split or resumed
            torch.manual_seed(zlib.crc32(f"{dec.seed}/{part.name}/{items.start}".encode()))
        out = rollout(engine, adapter, rows, prompts, k, dec.sampling)
    scored = score_completions(part.task, out.texts, [row for row in rows for _ in range(k)], ctx)
    return [item_record(part, i, row, prompt.text, out.texts[n * k:(n + 1) * k], scored[n * k:(n + 1) * k], ctx)
            for n, (i, row, prompt) in enumerate(zip(items, rows, prompts))]


def split_metrics(task: Task, records: list[dict], samples: int) -> dict[str, float]:
    """The task's metric over one split's records, as fractions: `metric_label` (one column per
    value of `metric_group` and their sample-weighted total, when the task has a group), mean@k
    with k > 1 completions per item."""
    return part_columns(records, task.metric_component, task.metric_label, bool(task.metric_group), samples)


def reward_means(task: Task, records: list[dict]) -> dict[str, float]:
    """The mean of each reward component over every completion."""
    scores = [s for r in records for s in r["scores"]]
    return {c: sum(s[c] for s in scores) / max(1, len(scores)) for c in task.reward_components}


def held_out(part: Part, engine: Engine, adapter, ctx: ScoreContext, dec: Decoding, accelerator) -> dict[str, float]:
    """Training's held-out evaluation: this process's batches of the rows, the records of all
    processes gathered, the task's metric (and `reward/<component>`, each reward's mean) on every
    process. Every process makes the same number of generate calls (under ZeRO-3 generation is a
    collective): one short of batches repeats its first and drops the records."""
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = batches(len(part.rows), dec.batch_size, rank, world)
    calls = math.ceil(math.ceil(len(part.rows) / dec.batch_size) / world)
    records = []
    for n in range(calls):
        batch = mine[n] if n < len(mine) else range(0, min(dec.batch_size, len(part.rows)))
        got = evaluate_batch(part, batch, engine, adapter, ctx, dec)
        records += got if n < len(mine) else []
    records = gather_object(records) if world > 1 else records
    records = sorted(records, key=lambda r: r["index"])
    return {**split_metrics(part.task, records, dec.samples),
            **{f"reward/{k}": v for k, v in reward_means(part.task, records).items()}}
