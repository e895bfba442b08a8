"""Pure helpers of the trainer: the learning-rate schedule, padding, splitting into groups."""

import math
from types import SimpleNamespace

import pytest
import torch

from gpg_vl.rollout import Rollout, Scored
from gpg_vl.trainer import Trainer, TrainState, lr_factor, pad_stack, split_groups


@pytest.mark.parametrize("schedule,progress,expect", [
    ("linear", 0.0, 0.0), ("linear", 0.05, 0.5), ("linear", 0.1, 1.0), ("linear", 0.55, 0.5), ("linear", 1.0, 0.0),
    ("cosine", 0.1, 1.0), ("cosine", 0.55, 0.5), ("cosine", 1.0, 0.0),
    ("constant", 0.05, 0.5), ("constant", 0.9, 1.0),
])
def test_schedules_with_10_percent_warmup(schedule, progress, expect):
    # warmup to 0.1 of the budget, then: linear 1 - (p - .1)/.9 ; cosine (1 + cos(pi (p - .1)/.9)) / 2
    assert lr_factor(progress, 0.1, schedule) == pytest.approx(expect, abs=1e-12)


def test_cosine_mid_point():
    assert lr_factor(0.25, 0.0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)), abs=1e-12)


def test_no_warmup_starts_at_the_peak():
    assert lr_factor(0.0, 0.0, "linear") == 1.0


def test_pad_stack_pads_on_the_right():
    out = pad_stack([torch.tensor([[1, 2]]), torch.tensor([[3, 4, 5]])], 0)
    assert out.tolist() == [[1, 2, 0], [3, 4, 5]]


def test_split_groups_keeps_each_prompt_with_its_completions():
    ids = torch.arange(12).view(4, 3)
    rollout = Rollout([{"id": "a"}, {"id": "b"}], ids, torch.ones(4, 3), ["w", "x", "y", "z"])
    scored = Scored(rollout, torch.tensor([1.0, 0.0, 1.0, 1.0]), {"accuracy": torch.tensor([1.0, 0.0, 1.0, 1.0])}, 0)
    a, b = split_groups(scored, 2)
    assert a.row["id"] == "a" and a.completion_ids.tolist() == [[0, 1, 2], [3, 4, 5]] and a.valid
    assert b.row["id"] == "b" and b.rewards.tolist() == [1.0, 1.0] and not b.valid


@pytest.mark.parametrize("every,every_samples,step,before,after,due", [
    (0, 0, 5, 0, 640, False),
    (5, 0, 5, 0, 640, True), (5, 0, 4, 0, 640, False),
    (0, 1000, 3, 900, 1100, True),     # crossed 1000
    (0, 1000, 3, 1000, 1900, False),   # 1000 was the previous step's
    (0, 1000, 3, 1900, 3100, True),    # one evaluation for two multiples passed in one step
    (0, 1000, 1, 0, 640, False),
])
def test_evaluation_points_in_steps_or_in_generated_samples(every, every_samples, step, before, after, due):
    cfg = SimpleNamespace(train=SimpleNamespace(eval_every=every, eval_every_samples=every_samples))
    trainer = SimpleNamespace(cfg=cfg, state=TrainState(step=step, samples_generated=after))
    assert Trainer.eval_due(trainer, before) is due
