"""The records the training loop hands from one step of a step to the next.

    Rollout + rewards (gpg_vl.rollout.Scored) --split_groups--> Group, one per prompt
    Groups of every round --collect--> StepBatch: what this rank trains, and how it was found
    Counters saved with each checkpoint: TrainState
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from gpg_vl import algorithm as alg
from gpg_vl.models.base import EncodedPrompt
from gpg_vl.rollout import Scored
from gpg_vl.task import Row


def _valid(rewards: Tensor) -> bool:
    return bool(alg.valid_groups(rewards, len(rewards))[0])


class GroupStats(NamedTuple):
    """What the step's metrics need of a generated group (no tensors of the prompt)."""

    rewards: Tensor  # [G]
    components: dict[str, Tensor]  # name -> [G]
    lengths: Tensor  # [G] completion tokens, EOS included

    @property
    def valid(self) -> bool:
        return _valid(self.rewards)


class Group(NamedTuple):
    """The G completions of one prompt, with the prompt as the model read it and the rewards."""

    row: Row
    prompt: EncodedPrompt
    completion_ids: Tensor  # [G, T]
    completion_mask: Tensor  # [G, T]
    logprobs: Tensor  # [G, T] rollout-time log-probs of the sampled tokens
    rewards: Tensor  # [G]
    components: dict[str, Tensor]  # name -> [G]

    @property
    def valid(self) -> bool:
        return _valid(self.rewards)

    def stats(self) -> GroupStats:
        return GroupStats(self.rewards, self.components, self.completion_mask.sum(1))


class StepBatch(NamedTuple):
    """What one optimizer step trains on this rank, and how it was collected."""

    groups: list[Group]  # prompts_per_device * grad_accum groups, valid first, balanced across ranks
    rounds: int  # generation rounds used (same on every rank)
    exhausted: bool  # the round limit or the data budget ended resampling below beta_th
    generated: list[GroupStats]  # every group generated this step on this rank, all rounds
    samples: int  # completions generated this step, all rounds and ranks
    generated_tokens: int
    reward_failures: int
    sent: int = 0  # groups this rank sent to other ranks when balancing (gpg_vl.balance)
    received: int = 0  # groups it received

    @property
    def trained_valid(self) -> int:
        """Valid groups among those trained on this rank."""
        return sum(g.valid for g in self.groups)


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
    """One Group per prompt of a scored rollout (completions are ordered group by group)."""
    r = scored.rollout

    def part(t: Tensor, i: int) -> Tensor:
        return t[i * group_size:(i + 1) * group_size]

    return [Group(row, prompt, part(r.completion_ids, i), part(r.completion_mask, i), part(r.logprobs, i),
                  part(scored.rewards, i), {k: part(v, i) for k, v in scored.components.items()})
            for i, (row, prompt) in enumerate(zip(r.rows, r.prompts))]


def pad_stack(tensors: list[Tensor], value: float) -> Tensor:
    """[n_i, T_i] tensors -> [sum n_i, max T_i], padded on the right."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])
