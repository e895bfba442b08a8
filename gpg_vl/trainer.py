"""The training loop, top to bottom.

One optimizer step:
    draw prompts -> encode each once -> generate G per prompt -> score -> count valid groups
    over all ranks -> [resample while the trainable valid fraction is under beta_th] -> balance
    the batch across ranks (whole groups, valid first, invalid filler) -> alpha from what is trained ->
    micro-batches of log-probs (each prompt once per group) and loss -> backward, clip, step
    -> metrics, evaluation, checkpoint.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

from gpg_vl import algorithm as alg
from gpg_vl import build, trackers
from gpg_vl.balance import balance_groups, join_buffer
from gpg_vl.checkpoint import save_checkpoint
from gpg_vl.config import Config, to_dict
from gpg_vl.data import PromptStream
from gpg_vl.distributed import Watchdog, generation_context, run_shape
from gpg_vl.evaluation import decoding, held_out
from gpg_vl.lora import merged_state_dict
from gpg_vl.metrics import PLOT_FILE, MetricsLogger, format_line, plot_curves, truncate_after
from gpg_vl.models.base import collate
from gpg_vl.models.policy import PolicyLogprobs
from gpg_vl.records import Group, GroupStats, StepBatch, TrainState, pad_stack, split_groups
from gpg_vl.rollout import SamplingSettings, encode_rows, rollout, score
from gpg_vl.schedule import Budget, Counters, eval_due, lr_factor
from gpg_vl.scoring import start_reward_workers
from gpg_vl.task import ScoreContext, Task, build_task


class PhaseTimer:
    """Seconds spent in each phase of a step (encode, generate, score, balance, forward,
    backward, optimizer). On a GPU the device is synchronised at each boundary, so that a phase is
    charged for its own kernels."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[phase] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """time/<phase> of the step just taken, and a fresh start for the next."""
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        self.seconds.clear()
        return out


class Trainer:
    def __init__(self, cfg: Config):
        from accelerate.utils import set_seed

        self.cfg = cfg
        t, a = cfg.train, cfg.algorithm
        self.accelerator = acc = build.make_accelerator(t)
        self.watch = Watchdog(Path(t.output_dir) / "ranks", acc.process_index, acc.num_processes, t.dist_timeout_s)
        set_seed(t.seed, device_specific=True)  # each rank samples its own completions
        self.G = a.group_size
        self.algorithm = a.name
        self.aggregation = a.resolved("loss_aggregation")
        self.adv_norm = a.resolved("advantage_norm")
        self.alpha_on = a.resolved("alpha_correction")
        self.beta_th = a.resolved("beta_th")
        r = cfg.rollout
        self.sampling = SamplingSettings(r.max_new_tokens, False, r.temperature, r.top_p, r.top_k)
        self.local_groups = t.prompts_per_device * t.grad_accum
        self.shape = run_shape(acc, t.prompts_per_device, t.grad_accum, self.G)
        with self.watch.phase("setup", 0):
            self._build()

    def _build(self) -> None:  # the task's rows, the policy, its optimizer, the reference; the resume point
        cfg, t, acc = self.cfg, self.cfg.train, self.accelerator
        self.task: Task = build_task(cfg.task)
        dtype = build.weights_dtype(cfg, acc)
        self.adapter = build.load_policy(cfg, dtype, cfg.model.gradient_checkpointing)
        self.ctx = ScoreContext(boxes=self.adapter.box_convention)
        self._load_rows()
        start_reward_workers(self.task)  # after every split is read: the workers get a copy of the task
        if self.eval_part is not None and self.eval_part.task is not self.task:
            start_reward_workers(self.eval_part.task)  # another task evaluates (sat trains, cvbench evaluates)
        self.stream = PromptStream(len(self.train_rows), self.local_groups * acc.num_processes, t.seed,
                                   acc.process_index, acc.num_processes)
        self.budget = Budget.choose(t.max_steps, t.max_samples, t.epochs, self.stream.batches_per_epoch)

        build.tell_deepspeed(acc, t, self.G, self.adapter.model.config)
        policy = PolicyLogprobs(self.adapter.model)
        self.model, self.optimizer = acc.prepare(policy, build.make_optimizer(policy, t))
        self.ref_model = build.load_reference(cfg, acc, dtype)  # after prepare: ZeRO-3 shards it likewise
        self.engine = build.make_engine(cfg, self.adapter, self.task, self.train_rows, self.eval_part, acc)
        self.phases = PhaseTimer(acc.device)
        self.state = TrainState()
        acc.register_for_checkpointing(self.stream, self.state)
        self._restore_and_open_logs(build.resume_point(acc, t, self.shape))
        self.push_weights()
        self.phases.take()  # the first push (the weights resumed from, if any) belongs to no step

    def _load_rows(self) -> None:
        """Training and held-out rows; prompts over rollout.max_prompt_tokens are skipped, counted."""
        limit, split = self.cfg.rollout.max_prompt_tokens, self.cfg.task.train_split
        self.train_rows, too_long = build.drop_long_prompts(list(self.task.rows(split)), self.task, self.adapter,
                                                            limit)
        self.eval_part, eval_too_long = build.eval_part(self.task, self.cfg, self.adapter, self.accelerator.print)
        self.eval_rows = self.eval_part.rows if self.eval_part is not None else []
        # The rows used, the bad rows dropped (task.on_bad_row=skip) and, under a limit, the prompts over it.
        eval_skipped = self.eval_part.task.skipped_rows(self.eval_part.split) if self.eval_part is not None else 0
        self.data_counts = {"data/train_rows": len(self.train_rows), "data/eval_rows": len(self.eval_rows),
                            "data/train_rows_skipped": self.task.skipped_rows(split),
                            "data/eval_rows_skipped": eval_skipped}
        if limit > 0:
            self.data_counts["data/prompts_over_limit"] = too_long + eval_too_long
        if too_long + eval_too_long:
            self.accelerator.print(f"skipped {too_long} training and {eval_too_long} held-out prompts longer than "
                                   f"rollout.max_prompt_tokens={limit} tokens")

    def _restore_and_open_logs(self, resume_from: Path | None) -> None:
        acc, t = self.accelerator, self.cfg.train
        if resume_from is not None:
            acc.load_state(str(resume_from))
            acc.print(f"resumed from {resume_from} at step {self.state.step}")
        resume_step = self.state.step if resume_from is not None else None
        self.logger = MetricsLogger(t.output_dir, acc.is_main_process, t.tensorboard, resume_step)
        trackers.start(acc, to_dict(self.cfg), t.output_dir, t.run_name or Path(t.output_dir).name)
        self.samples = trackers.SamplesLog(t.output_dir, acc.is_main_process and t.log_samples_every > 0, resume_step)
        self.rank_log = Path(t.output_dir) / "ranks" / f"rank{acc.process_index}.jsonl"
        self.rank_log.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.rank_log.write_text("")
            self.logger.log(0, self.data_counts)
        else:
            truncate_after(self.rank_log, resume_step)

    def counters(self) -> Counters:
        return Counters(self.state.step, self.stream.batches_consumed, self.state.samples_generated)

    # ---- collect: generation, scoring and beta_th resampling ------------------------------
    def _generate_round(self) -> tuple[list[Group], int, int]:
        """One global batch of prompts: (groups, reward failures, generated tokens) on this rank."""
        ppd = self.cfg.train.prompts_per_device
        rows = [self.train_rows[i] for i in self.stream.next_local()]
        with self.phases("encode"):
            prompts = encode_rows(self.adapter, self.task, rows)
        self.adapter.model.eval()
        groups, failures, tokens = [], 0, 0
        with generation_context(self.accelerator, self.model):
            for i in range(0, len(rows), ppd):
                with self.phases("generate"):
                    r = rollout(self.engine, self.adapter, rows[i:i + ppd], prompts[i:i + ppd], self.G, self.sampling)
                with self.phases("score"):
                    scored = score(self.task, r, self.ctx, self.G)
                failures += scored.failures
                tokens += int(r.completion_mask.sum())
                groups += split_groups(scored, self.G)
        return groups, failures, tokens

    def collect(self) -> StepBatch:
        """Generate rounds until the valid groups reach beta_th * B over all ranks, then balance
        them across ranks (gpg_vl.balance). Every rank runs the same number of rounds: the
        decision uses the global count of what can be trained (at most B valid groups are kept).
        """
        acc = self.accelerator
        world, capacity = acc.num_processes, self.local_groups * acc.num_processes  # B
        need = self.beta_th * capacity
        buffer: list[Group] = []
        filler: list[Group] = []
        generated: list[GroupStats] = []
        tokens = failures = rounds = buffered = 0
        exhausted = False
        while True:
            groups, f, n_tok = self._generate_round()
            rounds += 1
            generated += [g.stats() for g in groups]
            failures, tokens = failures + f, tokens + n_tok
            # Valid groups beyond B over all ranks, and invalid ones but the last round's (the
            # filler), can never be trained: they are dropped now, pixel values and all.
            valid = [g for g in groups if g.valid]
            take, buffered = join_buffer(acc, len(valid), buffered, capacity)
            buffer += valid[:take]
            filler = [g for g in groups if not g.valid]
            if buffered >= need:
                break
            pending = len(generated) * self.G * world
            if rounds >= self.cfg.algorithm.max_resample_rounds or not self.budget.may_generate(self.counters(),
                                                                                                 pending):
                exhausted = True  # train on what there is; the metrics say so
                break
        with self.phases("balance"):
            chosen = balance_groups(acc, buffer, filler, self.local_groups)
        # Every rank generated as many groups (same rounds, same share of each batch).
        return StepBatch(chosen.groups, rounds, exhausted, generated, len(generated) * self.G * world, tokens,
                         failures, chosen.sent, chosen.received)

    def _global_sum(self, value: float) -> float:
        t = torch.tensor([float(value)], device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum").item())

    # ---- update -------------------------------------------------------------------------
    def update(self, batch: StepBatch, lr: float) -> dict[str, float]:
        """Micro-batches of log-probs and loss, one optimizer step at learning rate `lr` (GRPO:
        algorithm.updates_per_batch of them, the first on-policy, the later ones with the ratio
        against the rollout policy clipped)."""
        t, acc = self.cfg.train, self.accelerator
        n_valid = self._global_sum(batch.trained_valid)
        n_groups = self.local_groups * acc.num_processes
        inv_alpha = alg.inverse_alpha(int(n_valid), n_groups) if self.alpha_on else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.engine.sleep()
        losses, stats, grad_norm = [], [], float("nan")
        for update, i in itertools.product(range(self.cfg.algorithm.updates_per_batch),
                                           range(0, len(batch.groups), t.prompts_per_device)):
            micro = batch.groups[i:i + t.prompts_per_device]
            with acc.accumulate(self.model):
                with self.phases("forward"):
                    loss, loss_stats = self._micro_loss(micro, inv_alpha, on_policy=update == 0)
                with self.phases("backward"):
                    acc.backward(loss)
                losses.append(loss.detach())
                stats.append(torch.stack([loss_stats.kl, loss_stats.clip_fraction]).float())
                with self.phases("optimizer"):
                    if acc.sync_gradients:
                        grad_norm = self._clip()
                    self.optimizer.step()
                    self.optimizer.zero_grad()
        self.push_weights()
        loss = acc.reduce(torch.stack(losses).mean(), reduction="mean")
        self._log_rank(batch, inv_alpha)
        m = {"loss": float(loss), "grad_norm": grad_norm, "inverse_alpha": inv_alpha,
             "valid_fraction": n_valid / n_groups, "lr": lr}
        if self.algorithm != "gpg":  # GPG has neither a KL term nor a ratio to clip
            kl, clipped = acc.reduce(torch.stack(stats).mean(0), reduction="mean").tolist()
            m.update({"kl": kl, "clip_fraction": clipped})
        return m

    def push_weights(self) -> None:
        """A vLLM engine samples from a copy of the weights: after every optimizer step, and at
        start (the weights resumed from), it gets the trainer's (ZeRO-3: gathered first)."""
        if self.engine.holds_weights:
            with self.phases("weight_sync"), generation_context(self.accelerator, self.model):
                # LoRA merged in: vLLM is sent the plain model's weights under their own names.
                self.engine.load_weights(merged_state_dict(self.adapter.model.state_dict(), self.adapter.lora).items())

    def _log_samples(self, batch: StepBatch) -> None:
        """Every train.log_samples_every steps: this rank's first groups, each completion with
        its prompt and rewards, to samples.jsonl and the trackers (main process)."""
        t, step = self.cfg.train, self.state.step + 1
        if not (self.samples.enabled and step % t.log_samples_every == 0):
            return
        groups = batch.groups[:t.log_samples]
        texts = [self.adapter.decode(g.completion_ids, g.completion_mask) for g in groups]
        self.samples.write(self.accelerator, trackers.sample_rows(step, groups, texts, self.task.reward_components))

    def _log_rank(self, batch: StepBatch, inv_alpha: float) -> None:
        """One line per step and rank: how the valid groups fell across ranks (the reference's
        defect was that they fell unevenly and unseen)."""
        acc = self.accelerator
        record = {"step": self.state.step + 1, "rank": acc.process_index, "rounds": batch.rounds,
                  "local_valid": batch.trained_valid, "local_groups": len(batch.groups), "inverse_alpha": inv_alpha,
                  "generated_valid": sum(s.valid for s in batch.generated), "sent": batch.sent,
                  "received": batch.received, "batches_consumed": self.stream.batches_consumed}
        with self.rank_log.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _micro_loss(self, micro: list[Group], inv_alpha: float, on_policy: bool = True) -> tuple[Tensor, alg.LossStats]:
        a, G, dev = self.cfg.algorithm, self.G, self.accelerator.device
        prompts = collate([g.prompt for g in micro], self.adapter.pad_token_id).to(dev)
        ids = pad_stack([g.completion_ids for g in micro], self.adapter.pad_token_id).to(dev)  # [N, T]
        mask = pad_stack([g.completion_mask for g in micro], 0).to(dev)  # [N, T]
        rewards = torch.cat([g.rewards for g in micro]).to(dev)  # [N]
        advantages = alg.group_advantages(rewards, G, self.adv_norm)  # [N]
        chunk, temp = self.cfg.train.logprob_chunk, self.cfg.rollout.temperature
        logprobs = self.model(prompts, ids, mask, G, chunk, temp)  # [N, T]
        # pi_old of GRPO's ratio: the policy that generated the batch. On the first update that is
        # the current policy (ratio exactly 1); later ones compare with the log-probs recorded at
        # generation (same temperature, so the same pi_T).
        old = None if on_policy else pad_stack([g.logprobs for g in micro], 0.0).to(dev)  # [N, T]
        ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref = self.ref_model(prompts, ids, mask, G, chunk, temp)  # [N, T]
        return alg.policy_loss(self.algorithm, logprobs, advantages, mask.to(logprobs.dtype),
                               inv_alpha=inv_alpha, aggregation=self.aggregation,
                               constant=float(self.cfg.rollout.max_new_tokens), old_logprobs=old, ref_logprobs=ref,
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

        def gathered(items, field) -> Tensor:
            return acc.gather(torch.cat([field(g) for g in items]).float().to(acc.device))

        rewards = gathered(batch.generated, lambda g: g.rewards)
        m = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std())}
        for name in self.task.reward_components:
            m[f"reward/{name}"] = float(gathered(batch.generated, lambda g: g.components[name]).mean())
        m["trained_reward/mean"] = float(gathered(batch.groups, lambda g: g.rewards).mean())
        lengths = gathered(batch.generated, lambda g: g.lengths)
        m["completion_length/mean"] = float(lengths.mean())
        m["completion_length/max"] = float(lengths.max())
        m["completion_length/truncated"] = float((lengths >= self.cfg.rollout.max_new_tokens).float().mean())
        generate_time = self.phases.seconds["generate"]
        m["tokens_per_s"] = self._global_sum(batch.generated_tokens) / max(1e-9, generate_time)
        m["generate_time"] = generate_time
        m["resample_rounds"] = batch.rounds
        m["resample_exhausted"] = float(batch.exhausted)
        m["reward_failures"] = self._global_sum(batch.reward_failures)
        # Valid groups generated but not trained: only beyond B, never while filler is trained.
        m["valid_groups_dropped"] = self._global_sum(sum(s.valid for s in batch.generated) - batch.trained_valid)
        m["groups_moved"] = self._global_sum(batch.sent)
        m["samples_generated"] = self.state.samples_generated + batch.samples
        m["epoch"] = self.stream.epochs_done
        return m

    # ---- evaluation ---------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """The held-out evaluation (gpg_vl.evaluation.held_out, the one `gpg-vl eval` runs too) of
        the current policy: eval/<the task's metric>, and eval/reward/<component>, over all ranks."""
        self.adapter.model.eval()
        with generation_context(self.accelerator, self.model):
            values = held_out(self.eval_part, self.engine, self.adapter, self.ctx, decoding(self.cfg), self.accelerator)
        return {f"eval/{k}": v for k, v in values.items()}

    def _evaluate_and_report(self, bar) -> dict[str, float]:
        with self.watch.phase("evaluate", self.state.step):
            values = self.evaluate()
        self.logger.log(self.state.step, values)
        trackers.log(self.accelerator, self.state.step, values)
        if self.accelerator.is_main_process:
            how = "greedy" if self.cfg.eval.greedy else f"at temperature {self.cfg.eval.temperature}"
            bar.write(f"step {self.state.step:>4} | held-out ({how}) " + " | ".join(
                f"{k[5:]} {v:.3f}" for k, v in values.items() if not k.startswith("eval/reward/")))
        return values

    # ---- the loop -----------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One optimizer step: collect, update, count. Returns the step's metrics."""
        start = time.perf_counter()
        t = self.cfg.train
        # The learning rate of this step, from the budget used before it draws its data.
        lr = t.learning_rate * lr_factor(self.budget.progress(self.counters()), t.warmup_ratio, t.lr_schedule)
        with self.watch.phase("collect", self.state.step + 1):
            batch = self.collect()
            self._log_samples(batch)
        with self.watch.phase("metrics", self.state.step + 1):
            metrics = self.batch_metrics(batch)
        with self.watch.phase("update", self.state.step + 1):
            metrics.update(self.update(batch, lr))
        self.state.step += 1
        self.state.samples_generated += batch.samples
        metrics.update(self.phases.take())
        metrics["step_time"] = time.perf_counter() - start
        return metrics

    def fit(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        t, acc = self.cfg.train, self.accelerator
        unit = {"steps": "step", "batches": "batch", "samples": "sample"}[self.budget.unit]
        bar = tqdm(total=self.budget.total, initial=self.budget.used(self.counters()), unit=unit,
                   disable=not acc.is_main_process, dynamic_ncols=True)
        last_eval: dict[str, float] = {}
        if self.state.step == 0 and self.eval_rows:
            last_eval = self._evaluate_and_report(bar)
        while not self.budget.finished(self.counters()):
            samples_before = self.state.samples_generated
            metrics = self.step()
            self.logger.log(self.state.step, metrics)
            trackers.log(acc, self.state.step, metrics)
            bar.update(self.budget.used(self.counters()) - bar.n)
            bar.set_postfix(step=self.state.step, reward=f"{metrics['reward/mean']:.3f}",
                            valid=f"{metrics['valid_fraction']:.2f}")
            if acc.is_main_process and self.state.step % t.log_every == 0:
                bar.write(format_line(self.state.step, metrics))
            finished = self.budget.finished(self.counters())
            due = eval_due(self.state.step, samples_before, self.state.samples_generated, t.eval_every,
                           t.eval_every_samples)
            if self.eval_rows and (finished or due):
                last_eval = self._evaluate_and_report(bar)
            if finished or (t.save_every and self.state.step % t.save_every == 0):
                with self.watch.phase("checkpoint", self.state.step):
                    save_checkpoint(acc, self.model, self.adapter, t.output_dir, self.state.step,
                                    t.keep_checkpoints, self.shape)
        bar.close()
        self.logger.close()
        trackers.finish(acc)
        if acc.is_main_process and t.plot:
            plot_curves(self.logger.path, Path(t.output_dir) / PLOT_FILE)
        return last_eval


def train(cfg: Config) -> dict[str, float]:
    trainer = Trainer(cfg)
    if trainer.accelerator.is_main_process:
        import yaml

        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return trainer.fit()
