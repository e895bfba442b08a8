"""Rollout: G sampled completions per prompt in one batched `generate` call, then scoring.

Generation, scoring and the update are separate steps handing over typed records.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from transformers import GenerationConfig

from gpg_vl.scoring import score_completions
from gpg_vl.task import Row, ScoreContext, Task


class Rollout(NamedTuple):
    """Completions of one micro-batch: `len(rows)` groups of G, ordered group by group."""

    rows: list[Row]
    """[B_micro] the prompts' rows, one per group."""
    completion_ids: Tensor
    """[N, T] generated ids, padded after the end."""
    completion_mask: Tensor
    """[N, T] 1 on every generated token up to and including the first EOS."""
    texts: list[str]
    """[N] decoded completions, as the reward sees them."""


class Scored(NamedTuple):
    """A rollout with its rewards."""

    rollout: Rollout
    rewards: Tensor
    """[N] weighted sum of the reward components."""
    components: dict[str, Tensor]
    """name -> [N] each reward component."""
    failures: int
    """Completions whose reward raised or overran task.reward_timeout_s (scored 0)."""


def completion_mask(completion_ids: Tensor, eos_ids: list[int]) -> Tensor:
    """[N, T] 1 up to and including the first EOS; all 1 for a truncated completion."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # [N, T]
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).long()


# Every setting that reshapes the sampling distribution, at its neutral value. transformers
# fills any setting left unset from the checkpoint's generation_config (Qwen's instruct
# checkpoints ship a repetition penalty, for one); REINFORCE must sample from pi itself.
# min_new_tokens = 0 overrides any min_length too (setting both makes transformers warn).
NEUTRAL_SAMPLING = dict(repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                        min_new_tokens=0, typical_p=1.0, min_p=0.0, epsilon_cutoff=0.0,
                        eta_cutoff=0.0, diversity_penalty=0.0, num_beams=1, num_return_sequences=1)


def sampling_config(adapter, *, greedy: bool, temperature: float, top_p: float, top_k: int,
                    max_new_tokens: int) -> GenerationConfig:
    """The whole generation config of a rollout: nothing is inherited from the checkpoint."""
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p,
                                                         top_k=top_k)
    return GenerationConfig(
        **NEUTRAL_SAMPLING, **sampling, max_new_tokens=max_new_tokens,
        eos_token_id=adapter.eos_token_ids, pad_token_id=adapter.pad_token_id,
        # A sampled vision token (<|image_pad|>, ...) breaks the next forward pass: forbid it.
        suppress_tokens=adapter.suppressed_token_ids or None,
    )


@torch.no_grad()
def generate(model, adapter, task: Task, rows: list[Row], group_size: int, *, greedy: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256) -> Rollout:
    """Sample `group_size` completions for each row in one `generate` call.

    `model` is the unwrapped model (generation needs no gradient sync).
    """
    inputs = adapter.build_group_inputs([task.prompt(row) for row in rows], [task.images(row) for row in rows],
                                        group_size)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    out = model.generate(**inputs, generation_config=sampling_config(
        adapter, greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens))
    prompt_len = inputs["input_ids"].shape[1]
    ids = out[:, prompt_len:]  # [N, T]
    mask = completion_mask(ids, adapter.eos_token_ids)  # [N, T]
    ids = ids.masked_fill(mask == 0, adapter.pad_token_id)
    texts = adapter.decode(ids, mask)
    return Rollout(rows, ids.cpu(), mask.cpu(), texts)


def score(task: Task, rollout: Rollout, ctx: ScoreContext, group_size: int) -> Scored:
    """Reward every completion, in the task's reward workers (gpg_vl/scoring.py); a reward that
    raises or overruns its time limit scores 0 and is counted."""
    values = {k: [] for k in task.reward_components}
    totals, failures = [], 0
    rows = [rollout.rows[i // group_size] for i in range(len(rollout.texts))]
    for comps, ok in score_completions(task, rollout.texts, rows, ctx):
        failures += not ok
        totals.append(task.total_reward(comps))
        for k, v in comps.items():
            values[k].append(v)
    return Scored(
        rollout,
        torch.tensor(totals, dtype=torch.float32),
        {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()},
        failures,
    )
