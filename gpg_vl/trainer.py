"""The training loop, top to bottom.

One optimizer step:
    draw prompts -> generate G per prompt -> score -> count valid groups over all ranks
    -> [resample while the trainable valid fraction is under beta_th] -> assemble the batch
    (valid groups first, invalid filler) -> alpha from what is trained -> micro-batches of
    log-probs and loss -> backward, clip, step -> metrics, evaluation, checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from gpg_vl import algorithm as alg
from gpg_vl.checkpoint import finish_interrupted, list_checkpoints, resolve_resume, save_checkpoint
from gpg_vl.config import Config, to_dict
from gpg_vl.data import PromptStream
from gpg_vl.metrics import PLOT_FILE, MetricsLogger, format_line, plot_curves, truncate_after
from gpg_vl.rollout import Scored, generate, score
from gpg_vl.scoring import start_reward_workers
from gpg_vl.task import Row, ScoreContext, Task, build_task


class Group(NamedTuple):
    """The G completions of one prompt, with their rewards."""

    row: Row
    completion_ids: Tensor  # [G, T]
    completion_mask: Tensor  # [G, T]
    rewards: Tensor  # [G]
    components: dict[str, Tensor]  # name -> [G]

    @property
    def valid(self) -> bool:
        return bool(alg.valid_groups(self.rewards, len(self.rewards))[0])


class StepBatch(NamedTuple):
    """What one optimizer step trains on this rank, and how it was collected."""

    groups: list[Group]  # prompts_per_device * grad_accum groups, valid first
    rounds: int  # generation rounds used (same on every rank)
    exhausted: bool  # the round limit or the data budget ended resampling below beta_th
    generated: list[Group]  # every group generated this step on this rank, all rounds
    generated_tokens: int
    reward_failures: int
    generate_time: float


@dataclass
class TrainState:
    """Counters saved with each checkpoint."""

    step: int = 0
    samples_generated: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_generated": self.samples_generated}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_generated = state["step"], state["samples_generated"]


def split_groups(scored: Scored, group_size: int) -> list[Group]:
    r = scored.rollout
    return [Group(row, r.completion_ids[i * group_size:(i + 1) * group_size],
                  r.completion_mask[i * group_size:(i + 1) * group_size],
                  scored.rewards[i * group_size:(i + 1) * group_size],
                  {k: v[i * group_size:(i + 1) * group_size] for k, v in scored.components.items()})
            for i, row in enumerate(r.rows)]


def pad_stack(tensors: list[Tensor], value: int) -> Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])


def lr_factor(progress: float, warmup: float, schedule: str) -> float:
    """Learning-rate multiplier at `progress` in [0, 1] of the training budget."""
    if progress < warmup:
        return progress / warmup
    rest = (progress - warmup) / max(1e-12, 1.0 - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - rest)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, rest)))
    return 1.0


class Trainer:
    def __init__(self, cfg: Config):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from gpg_vl.models import load_adapter

        self.cfg = cfg
        t, a = cfg.train, cfg.algorithm
        mixed = t.mixed_precision if t.mixed_precision != "auto" else ("bf16" if torch.cuda.is_available() else "no")
        self.accelerator = acc = Accelerator(gradient_accumulation_steps=t.grad_accum, mixed_precision=mixed)
        set_seed(t.seed, device_specific=True)  # each rank samples its own completions
        self.G = a.group_size
        self.algorithm = a.name
        self.aggregation = a.resolved("loss_aggregation")
        self.adv_norm = a.resolved("advantage_norm")
        self.alpha_on = a.resolved("alpha_correction")
        self.beta_th = a.resolved("beta_th")

        self.task: Task = build_task(cfg.task)
        self.train_rows = list(self.task.rows(cfg.task.train_split))
        self.eval_rows = self._eval_rows()
        start_reward_workers(self.task)  # after every split is read: the workers get a copy of the task
        self.local_groups = t.prompts_per_device * t.grad_accum
        self.stream = PromptStream(len(self.train_rows), self.local_groups * acc.num_processes, t.seed,
                                   acc.process_index, acc.num_processes)

        ds = acc.state.deepspeed_plugin
        dtype = cfg.model.dtype
        if dtype == "auto":  # bf16 weights only where DeepSpeed keeps fp32 master weights
            dtype = "bfloat16" if ds is not None and mixed == "bf16" else "float32"
        load = dict(dtype=dtype, max_pixels=cfg.model.max_pixels, min_pixels=cfg.model.min_pixels,
                    attn_implementation=cfg.model.attn_implementation or None,
                    trust_remote_code=cfg.model.trust_remote_code)
        self.adapter = load_adapter(cfg.model.path, gradient_checkpointing=cfg.model.gradient_checkpointing, **load)
        self.ctx = ScoreContext(boxes=self.adapter.box_convention)
        self.ref_model = None
        if self.algorithm != "gpg" and a.kl_coef > 0:  # GPG never loads a reference model
            if ds is not None and ds.zero_stage == 3:
                raise ValueError("a KL reference model is not supported under ZeRO-3 yet: use the zero2 "
                                 "launcher, or algorithm.kl_coef=0")
            self.ref_model = load_adapter(cfg.model.path, **load).model.to(acc.device).eval().requires_grad_(False)
        if ds is not None:  # nothing is prepared from a dataloader, so DeepSpeed is told the sizes
            ds.deepspeed_config["train_micro_batch_size_per_gpu"] = t.prompts_per_device * self.G
            ds.deepspeed_config["gradient_accumulation_steps"] = t.grad_accum
            ds.deepspeed_config["gradient_clipping"] = t.max_grad_norm
        optimizer = torch.optim.AdamW(self.adapter.model.parameters(), lr=t.learning_rate,
                                      betas=t.adam_betas, weight_decay=t.weight_decay)
        self.model, self.optimizer = acc.prepare(self.adapter.model, optimizer)
        self.state = TrainState()
        acc.register_for_checkpointing(self.stream, self.state)

        total_batches = math.ceil(t.epochs * self.stream.batches_per_epoch)
        if t.max_samples > 0:
            self.budget = ("samples", t.max_samples)
        elif t.max_steps > 0:
            self.budget = ("steps", t.max_steps)
        else:
            self.budget = ("batches", total_batches)
        finish_interrupted(acc, t.output_dir)
        resume_from = resolve_resume(t.output_dir, t.resume)
        if resume_from is None and list_checkpoints(t.output_dir):
            raise FileExistsError(f"{t.output_dir} holds checkpoints of an earlier run: pass --resume "
                                  f"(train.resume=latest) to continue it, or choose another train.output_dir")
        if resume_from is not None:
            acc.load_state(str(resume_from))
            acc.print(f"resumed from {resume_from} at step {self.state.step}")
        resume_step = self.state.step if resume_from is not None else None
        self.logger = MetricsLogger(t.output_dir, acc.is_main_process, t.tensorboard, resume_step)
        if resume_step is None:  # the rows used, and the bad rows dropped (task.on_bad_row=skip)
            self.logger.log(0, {"data/train_rows": len(self.train_rows), "data/eval_rows": len(self.eval_rows),
                                "data/train_rows_skipped": self.task.skipped_rows(cfg.task.train_split),
                                "data/eval_rows_skipped": self.task.skipped_rows(cfg.task.eval_split)})
        self.rank_log = Path(t.output_dir) / "ranks" / f"rank{acc.process_index}.jsonl"
        self.rank_log.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.rank_log.write_text("")
        else:
            truncate_after(self.rank_log, resume_step)

    def _eval_rows(self) -> list[Row]:
        c = self.cfg.task
        if not c.eval_split:
            return []
        try:
            rows = list(self.task.rows(c.eval_split))
        except (KeyError, ValueError, FileNotFoundError) as err:
            self.accelerator.print(f"no held-out evaluation: split {c.eval_split!r} unavailable ({err})")
            return []
        return rows[:c.eval_size] if c.eval_size else rows

    # ---- progress of the budget -------------------------------------------------------
    def used(self) -> int:
        """How much of the budget is spent, in the budget's unit."""
        kind, _ = self.budget
        return {"steps": self.state.step, "batches": self.stream.batches_consumed,
                "samples": self.state.samples_generated}[kind]

    def progress(self) -> float:
        return min(1.0, self.used() / self.budget[1])

    def data_left(self, pending_samples: int = 0) -> bool:
        """Whether another generation round may start: the budget is not reached counting the
        `pending_samples` this step generated already (over all ranks). A sample budget may
        therefore be passed by part of one round."""
        kind, total = self.budget
        if kind == "samples":
            return self.state.samples_generated + pending_samples < total
        return kind == "steps" or self.stream.batches_consumed < total

    def finished(self) -> bool:
        return self.used() >= self.budget[1]

    # ---- collect: generation, scoring and beta_th resampling ------------------------------
    def _generate_round(self) -> tuple[list[Group], int, int, float]:
        t, r = self.cfg.train, self.cfg.rollout
        rows = [self.train_rows[i] for i in self.stream.next_local()]
        unwrapped = self.accelerator.unwrap_model(self.model)
        unwrapped.eval()
        groups, failures, tokens, start = [], 0, 0, time.perf_counter()
        with generation_context(self.accelerator, self.model):
            for i in range(0, len(rows), t.prompts_per_device):
                rollout = generate(unwrapped, self.adapter, self.task, rows[i:i + t.prompts_per_device], self.G,
                                   temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                   max_new_tokens=r.max_new_tokens)
                scored = score(self.task, rollout, self.ctx, self.G)
                failures += scored.failures
                tokens += int(rollout.completion_mask.sum())
                groups += split_groups(scored, self.G)
        return groups, failures, tokens, time.perf_counter() - start

    def collect(self) -> StepBatch:
        """Generate rounds until the trainable valid groups reach beta_th * B over all ranks.

        Every rank runs the same number of rounds: the decision uses the global count.
        The count is of what can really be trained: a rank keeps at most its share.
        """
        need = self.beta_th * self.local_groups * self.accelerator.num_processes
        buffer: list[Group] = []
        generated: list[Group] = []
        tokens = failures = 0
        gen_time = 0.0
        rounds, exhausted = 0, False
        while True:
            groups, f, n_tok, dt = self._generate_round()
            rounds += 1
            generated += groups
            failures, tokens, gen_time = failures + f, tokens + n_tok, gen_time + dt
            buffer += [g for g in groups if g.valid]
            trainable = self._global_sum(min(len(buffer), self.local_groups))
            if trainable >= need:
                break
            pending = len(generated) * self.G * self.accelerator.num_processes
            if rounds >= self.cfg.algorithm.max_resample_rounds or not self.data_left(pending):
                exhausted = True  # train on what there is; the metrics say so
                break
        filler = [g for g in groups if not g.valid]  # invalid groups of the last round
        chosen = (buffer[:self.local_groups] + filler)[:self.local_groups]
        return StepBatch(chosen, rounds, exhausted, generated, tokens, failures, gen_time)

    def _global_sum(self, value: float) -> float:
        t = torch.tensor([float(value)], device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum").item())

    # ---- update -------------------------------------------------------------------------
    def update(self, batch: StepBatch, lr: float) -> dict[str, float]:
        """Micro-batches of log-probs and loss, one optimizer step at learning rate `lr`."""
        t, acc = self.cfg.train, self.accelerator
        n_valid = self._global_sum(sum(g.valid for g in batch.groups))
        n_groups = self.local_groups * acc.num_processes
        inv_alpha = alg.inverse_alpha(int(n_valid), n_groups) if self.alpha_on else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        losses, stats, grad_norm = [], [], float("nan")
        for i in range(0, len(batch.groups), t.prompts_per_device):
            micro = batch.groups[i:i + t.prompts_per_device]
            with acc.accumulate(self.model):
                loss, loss_stats = self._micro_loss(micro, inv_alpha)
                acc.backward(loss)
                losses.append(loss.detach())
                stats.append(torch.stack([loss_stats.kl, loss_stats.clip_fraction]).float())
                if acc.sync_gradients:
                    grad_norm = self._clip()
                self.optimizer.step()
                self.optimizer.zero_grad()
        loss = acc.reduce(torch.stack(losses).mean(), reduction="mean")
        self._log_rank(batch, inv_alpha)
        m = {"loss": float(loss), "grad_norm": grad_norm, "inverse_alpha": inv_alpha,
             "valid_fraction": n_valid / n_groups, "lr": lr}
        if self.algorithm != "gpg":  # GPG has neither a KL term nor a ratio to clip
            kl, clipped = acc.reduce(torch.stack(stats).mean(0), reduction="mean").tolist()
            m.update({"kl": kl, "clip_fraction": clipped})
        return m

    def _log_rank(self, batch: StepBatch, inv_alpha: float) -> None:
        """One line per step and rank: how the valid groups fell across ranks (the reference's
        defect was that they fell unevenly and unseen)."""
        acc = self.accelerator
        record = {"step": self.state.step + 1, "rank": acc.process_index, "rounds": batch.rounds,
                  "local_valid": sum(g.valid for g in batch.groups), "local_groups": len(batch.groups),
                  "inverse_alpha": inv_alpha, "batches_consumed": self.stream.batches_consumed}
        with self.rank_log.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _micro_loss(self, micro: list[Group], inv_alpha: float) -> tuple[Tensor, alg.LossStats]:
        a, G, dev = self.cfg.algorithm, self.G, self.accelerator.device
        inputs = self.adapter.build_group_inputs([self.task.prompt(g.row) for g in micro],
                                                 [self.task.images(g.row) for g in micro], G)
        inputs = {k: v.to(dev) for k, v in inputs.items()}
        ids = pad_stack([g.completion_ids for g in micro], self.adapter.pad_token_id).to(dev)  # [N, T]
        mask = pad_stack([g.completion_mask for g in micro], 0).to(dev)  # [N, T]
        rewards = torch.cat([g.rewards for g in micro]).to(dev)  # [N]
        advantages = alg.group_advantages(rewards, G, self.adv_norm)  # [N]
        chunk, temp = self.cfg.train.logprob_chunk, self.cfg.rollout.temperature
        logprobs = self.adapter.completion_logprobs(self.model, inputs, ids, mask, chunk, temp)  # [N, T]
        ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref = self.adapter.completion_logprobs(self.ref_model, inputs, ids, mask, chunk, temp)  # [N, T]
        return alg.policy_loss(self.algorithm, logprobs, advantages, mask.to(logprobs.dtype),
                                  inv_alpha=inv_alpha, aggregation=self.aggregation,
                                  constant=float(self.cfg.rollout.max_new_tokens), ref_logprobs=ref,
                                  clip_eps=a.clip_eps, kl_coef=a.kl_coef)

    def _clip(self) -> float:
        t, acc = self.cfg.train, self.accelerator
        # Under DeepSpeed this returns the engine's global norm (it clips inside its step).
        norm = acc.clip_grad_norm_(self.model.parameters(), t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        return float(norm)

    # ---- metrics ------------------------------------------------------------------------
    def batch_metrics(self, batch: StepBatch) -> dict[str, float]:
        """reward/* and completion lengths over everything the policy generated this step (all
        rounds, all ranks: every rank ran the same rounds); trained_reward over the batch trained."""
        acc = self.accelerator

        def gathered(groups: list[Group], field) -> Tensor:
            return acc.gather(torch.cat([field(g) for g in groups]).float().to(acc.device))

        rewards = gathered(batch.generated, lambda g: g.rewards)
        m = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std())}
        for name in self.task.reward_components:
            m[f"reward/{name}"] = float(gathered(batch.generated, lambda g: g.components[name]).mean())
        m["trained_reward/mean"] = float(gathered(batch.groups, lambda g: g.rewards).mean())
        lengths = gathered(batch.generated, lambda g: g.completion_mask.sum(1))
        m["completion_length/mean"] = float(lengths.mean())
        m["completion_length/max"] = float(lengths.max())
        m["completion_length/truncated"] = float((lengths >= self.cfg.rollout.max_new_tokens).float().mean())
        generated = len(rewards)
        m["tokens_per_s"] = self._global_sum(batch.generated_tokens) / max(1e-9, batch.generate_time)
        m["generate_time"] = batch.generate_time
        m["resample_rounds"] = batch.rounds
        m["resample_exhausted"] = float(batch.exhausted)
        m["reward_failures"] = self._global_sum(batch.reward_failures)
        m["samples_generated"] = self.state.samples_generated + generated
        m["epoch"] = self.stream.epochs_done
        return m

    # ---- evaluation ---------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Greedy decoding on this rank's shard of the held-out rows; sums over all ranks.

        Every rank makes the same number of `generate` calls (under ZeRO-3 generation is a
        collective): a short shard is padded with its first row, whose scores are dropped.
        """
        acc, r = self.accelerator, self.cfg.rollout
        rows = self.eval_rows[acc.process_index::acc.num_processes]
        n_real = len(rows)
        per_rank = math.ceil(len(self.eval_rows) / acc.num_processes)
        rows = rows + [self.eval_rows[0]] * (per_rank - n_real)
        unwrapped = acc.unwrap_model(self.model)
        unwrapped.eval()
        sums = {k: 0.0 for k in self.task.reward_components}
        batch = max(1, self.cfg.train.prompts_per_device * self.G)
        with generation_context(acc, self.model):
            for i in range(0, len(rows), batch):
                rollout = generate(unwrapped, self.adapter, self.task, rows[i:i + batch], 1, greedy=True,
                                   max_new_tokens=r.max_new_tokens)
                scored = score(self.task, rollout, self.ctx, 1)
                real = max(0, min(batch, n_real - i))
                for k, v in scored.components.items():
                    sums[k] += float(v[:real].sum())
        totals = acc.reduce(torch.tensor([*sums.values(), float(n_real)], device=acc.device), reduction="sum")
        n = max(1.0, float(totals[-1]))
        return {f"eval/{k}": float(v) / n for k, v in zip(sums, totals[:-1])}

    def eval_due(self, samples_before: int) -> bool:
        """Whether the step just taken ends an evaluation interval: in steps, or in generated
        completions (this step crossed a multiple of eval_every_samples)."""
        t = self.cfg.train
        by_step = t.eval_every > 0 and self.state.step % t.eval_every == 0
        n = t.eval_every_samples
        return by_step or (n > 0 and samples_before // n != self.state.samples_generated // n)

    def _evaluate_and_report(self, bar) -> dict[str, float]:
        values = self.evaluate()
        self.logger.log(self.state.step, values)
        if self.accelerator.is_main_process:
            bar.write(f"step {self.state.step:>4} | held-out greedy " +
                      " | ".join(f"{k[5:]} {v:.3f}" for k, v in values.items()))
        return values

    # ---- the loop -----------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        t, acc = self.cfg.train, self.accelerator
        kind, total = self.budget
        unit = {"steps": "step", "batches": "batch", "samples": "sample"}[kind]
        bar = tqdm(total=total, initial=self.used(), unit=unit, disable=not acc.is_main_process, dynamic_ncols=True)
        last_eval: dict[str, float] = {}
        if self.state.step == 0 and self.eval_rows:
            last_eval = self._evaluate_and_report(bar)
        while not self.finished():
            start = time.perf_counter()
            # The learning rate of this step, from the budget used before it draws its data.
            lr = t.learning_rate * lr_factor(self.progress(), t.warmup_ratio, t.lr_schedule)
            batch = self.collect()
            metrics = self.batch_metrics(batch)
            metrics.update(self.update(batch, lr))
            self.state.step += 1
            samples_before, self.state.samples_generated = self.state.samples_generated, int(metrics["samples_generated"])
            metrics["step_time"] = time.perf_counter() - start
            self.logger.log(self.state.step, metrics)
            bar.update(self.used() - bar.n)
            bar.set_postfix(step=self.state.step, reward=f"{metrics['reward/mean']:.3f}",
                            valid=f"{metrics['valid_fraction']:.2f}")
            if acc.is_main_process and self.state.step % t.log_every == 0:
                bar.write(format_line(self.state.step, metrics))
            finished = self.finished()
            if self.eval_rows and (finished or self.eval_due(samples_before)):
                last_eval = self._evaluate_and_report(bar)
            if finished or (t.save_every and self.state.step % t.save_every == 0):
                save_checkpoint(acc, self.model, self.adapter, t.output_dir, self.state.step,
                                t.keep_checkpoints)
        bar.close()
        self.logger.close()
        if acc.is_main_process and t.plot:
            plot_curves(self.logger.path, Path(t.output_dir) / PLOT_FILE)
        return last_eval


def generation_context(accelerator, model):
    """Under ZeRO-3 gather the sharded weights once for the whole generation call."""
    import contextlib

    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()))
    return contextlib.nullcontext()


def train(cfg: Config) -> dict[str, float]:
    trainer = Trainer(cfg)
    if trainer.accelerator.is_main_process:
        import yaml

        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return trainer.fit()
