"""Pure helpers of the trainer: the budget, the learning-rate schedule, evaluation points,
padding, splitting into groups, the phase timer."""

import math
import time

import pytest
import torch

from gpg_vl.models.base import EncodedPrompt
from gpg_vl.records import pad_stack, split_groups
from gpg_vl.rollout import Rollout, Scored
from gpg_vl.schedule import Budget, Counters, eval_due, lr_factor
from gpg_vl.trainer import PhaseTimer


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


def test_one_budget_and_its_unit():
    assert Budget.choose(0, 500, 1.0, 10) == Budget("samples", 500)
    assert Budget.choose(7, 0, 1.0, 10) == Budget("steps", 7)
    assert Budget.choose(0, 0, 2.5, 10) == Budget("batches", 25)
    c = Counters(steps=3, batches=12, samples=384)
    assert Budget("steps", 6).used(c) == 3 and Budget("batches", 24).progress(c) == 0.5
    assert Budget("samples", 384).finished(c) and not Budget("steps", 4).finished(c)


def test_another_round_may_start_until_the_budget_is_spent():
    c = Counters(steps=2, batches=10, samples=900)
    # a sample budget counts what this step generated already; it may be passed by part of a round
    assert Budget("samples", 1000).may_generate(c, pending_samples=64)
    assert not Budget("samples", 1000).may_generate(c, pending_samples=100)
    # an epoch budget stops drawing at its last batch; a step budget never stops a round
    assert not Budget("batches", 10).may_generate(c) and Budget("batches", 11).may_generate(c)
    assert Budget("steps", 3).may_generate(c, pending_samples=10**9)


def test_pad_stack_pads_on_the_right():
    out = pad_stack([torch.tensor([[1, 2]]), torch.tensor([[3, 4, 5]])], 0)
    assert out.tolist() == [[1, 2, 0], [3, 4, 5]]


def test_split_groups_keeps_each_prompt_with_its_completions():
    ids = torch.arange(12).view(4, 3)
    prompts = [EncodedPrompt(t, torch.tensor([1, 2]), torch.zeros(1, 2), 2) for t in ("pa", "pb")]
    rollout = Rollout([{"id": "a"}, {"id": "b"}], prompts, ids, torch.ones(4, 3), -torch.ones(4, 3),
                      ["w", "x", "y", "z"])
    scored = Scored(rollout, torch.tensor([1.0, 0.0, 1.0, 1.0]), {"accuracy": torch.tensor([1.0, 0.0, 1.0, 1.0])}, 0)
    a, b = split_groups(scored, 2)
    assert a.row["id"] == "a" and a.prompt.text == "pa" and a.completion_ids.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert a.valid and a.stats().lengths.tolist() == [3, 3]
    assert b.row["id"] == "b" and b.prompt.text == "pb" and b.rewards.tolist() == [1.0, 1.0] and not b.valid


@pytest.mark.parametrize("every,every_samples,step,before,after,due", [
    (0, 0, 5, 0, 640, False),
    (5, 0, 5, 0, 640, True), (5, 0, 4, 0, 640, False),
    (0, 1000, 3, 900, 1100, True),     # crossed 1000
    (0, 1000, 3, 1000, 1900, False),   # 1000 was the previous step's
    (0, 1000, 3, 1900, 3100, True),    # one evaluation for two multiples passed in one step
    (0, 1000, 1, 0, 640, False),
])
def test_evaluation_points_in_steps_or_in_generated_samples(every, every_samples, step, before, after, due):
    assert eval_due(step, before, after, every, every_samples) is due


def test_phase_timer_adds_up_each_phase_and_starts_afresh():
    timer = PhaseTimer(torch.device("cpu"))
    for _ in range(2):
        with timer("generate"):
            time.sleep(0.01)
    with timer("score"):
        pass
    first = timer.take()
    assert set(first) == {"time/generate", "time/score"} and 0.02 <= first["time/generate"] < 1.0
    assert timer.take() == {}
