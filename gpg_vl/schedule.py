"""The training budget and the learning-rate schedule: pure functions of the counters.

A run has one budget, in one unit: optimizer steps, prompt batches drawn (epochs), or
completions generated (resampling included, all ranks: the fair budget when algorithms
generate different amounts per step). The learning rate follows the fraction of the
budget spent; evaluation points fall every so many steps or completions.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

Unit = Literal["steps", "batches", "samples"]


class Counters(NamedTuple):
    """How far a run has come, in each unit a budget can be given in."""

    steps: int  # optimizer steps taken
    batches: int  # global prompt batches drawn (every rank draws its share of each)
    samples: int  # completions generated, all rounds and ranks


class Budget(NamedTuple):
    unit: Unit
    total: int

    @classmethod
    def choose(cls, max_steps: int, max_samples: int, epochs: float, batches_per_epoch: int) -> "Budget":
        """The one budget a config sets (max_samples and max_steps exclude each other)."""
        if max_samples > 0:
            return cls("samples", max_samples)
        if max_steps > 0:
            return cls("steps", max_steps)
        return cls("batches", math.ceil(epochs * batches_per_epoch))

    def used(self, c: Counters) -> int:
        """How much is spent, in the budget's unit."""
        return {"steps": c.steps, "batches": c.batches, "samples": c.samples}[self.unit]

    def progress(self, c: Counters) -> float:
        return min(1.0, self.used(c) / self.total)

    def finished(self, c: Counters) -> bool:
        return self.used(c) >= self.total

    def may_generate(self, c: Counters, pending_samples: int = 0) -> bool:
        """Whether another generation round may start, counting the `pending_samples` the
        current step generated already (all ranks): a sample budget may be passed by part of
        one round; a step budget never stops a round."""
        if self.unit == "samples":
            return c.samples + pending_samples < self.total
        return self.unit == "steps" or c.batches < self.total


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


def eval_due(step: int, samples_before: int, samples_after: int, every_steps: int, every_samples: int) -> bool:
    """Whether the step just taken ends an evaluation interval: in steps, or in generated
    completions (this step crossed a multiple of every_samples)."""
    by_step = every_steps > 0 and step % every_steps == 0
    by_samples = every_samples > 0 and samples_before // every_samples != samples_after // every_samples
    return by_step or by_samples
