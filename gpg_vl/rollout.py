"""Rollout: encode each prompt once, sample G completions per prompt, score them.

Generation, scoring and the update are separate steps handing over typed records. The
record of a prompt (`EncodedPrompt`: tokens, pixel values, positions) is made once, here,
and is what generation, the loss forward and the evaluation all read.

The Hugging Face engine below prefills each prompt once per group (its image through the
vision tower once) and samples the G completions from copies of that cache, in its own
decoding loop: a complete, explicit sampling rule, so that nothing is inherited from a
checkpoint's generation_config (Qwen's instruct checkpoints ship a repetition penalty; a
policy gradient must sample from pi itself).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from gpg_vl.models.base import EncodedPrompt, collate, continued_positions, squeeze_axes
from gpg_vl.scoring import score_completions
from gpg_vl.task import Row, ScoreContext, Task

TOP_P_FIRST_K = 64  # nucleus search starts among this many most likely tokens (exact: it widens as needed)


class SamplingSettings(NamedTuple):
    """How completions are drawn."""

    max_new_tokens: int
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off


class Generated(NamedTuple):
    """Completions of B prompts, G each, ordered group by group (N = B * G)."""

    completion_ids: Tensor
    """[N, T] generated ids, padded after the end."""
    completion_mask: Tensor
    """[N, T] 1 on every generated token up to and including the first EOS."""
    logprobs: Tensor
    """[N, T] log pi_T of each sampled token under the sampling policy (pi_T = softmax(logits /
    temperature) over the whole vocabulary, as the loss computes it), 0 where the mask is 0."""


class Rollout(NamedTuple):
    """A micro-batch's prompts, as the model read them, and their completions."""

    rows: list[Row]
    """[B] the prompts' rows, one per group."""
    prompts: list[EncodedPrompt]
    """[B] the encoded prompts (tokens, pixel values, positions)."""
    completion_ids: Tensor
    """[N, T]"""
    completion_mask: Tensor
    """[N, T]"""
    logprobs: Tensor
    """[N, T] rollout-time log-probs of the sampled tokens."""
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


class Engine(Protocol):
    """Samples completions for encoded prompts from the current policy."""

    holds_weights: bool
    """False: samples from the training model itself. True: from a copy of its weights, which
    the trainer replaces after every optimizer step (load_weights)."""

    def generate(self, prompts: list[EncodedPrompt], group_size: int, sampling: SamplingSettings) -> Generated: ...

    def sleep(self) -> None:
        """Free what generation holds while the trainer updates; load_weights restores it."""

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Sample from these weights (the trainer's whole state_dict) from now on."""


# ---------------------------------------------------------------- sampling rule


def completion_mask(completion_ids: Tensor, eos_ids: list[int]) -> Tensor:
    """[N, T] 1 up to and including the first EOS; all 1 for a truncated completion."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # [N, T]
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).long()


def sample_categorical(weights: Tensor) -> Tensor:
    """One index per row of non-negative (unnormalised) weights [N, V], by inverting the
    cumulative sum (float64): exact, and on CPU about twice as fast as torch.multinomial over a
    151k-token vocabulary. A zero weight is never drawn."""
    cdf = weights.cumsum(dim=-1, dtype=torch.float64)  # [N, V]
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]  # [N, 1]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=weights.shape[-1] - 1)  # [N]


def keep_top_p(weights: Tensor, top_p: float) -> Tensor:
    """Zero every token outside the nucleus: the most likely tokens whose mass reaches top_p
    (a token is kept while the mass of the tokens more likely than it is below top_p)."""
    probs = weights / weights.sum(dim=-1, keepdim=True)  # [N, V]
    k = min(TOP_P_FIRST_K, probs.shape[-1])
    while True:
        top = probs.topk(k, dim=-1).values  # [N, k] descending
        if k == probs.shape[-1] or bool((top.sum(-1) >= top_p).all()):
            break  # the nucleus of every row lies within its top k
        k = min(probs.shape[-1], k * 4)
    kept = (top.cumsum(-1) - top) < top_p  # [N, k]; the most likely token is always kept
    smallest = top.masked_fill(~kept, float("inf")).amin(-1, keepdim=True)  # [N, 1]
    return weights.masked_fill(probs < smallest, 0.0)


def pick_tokens(logits: Tensor, sampling: SamplingSettings, suppressed: Tensor | None) -> tuple[Tensor, Tensor]:
    """Next tokens [N] from raw logits [N, V] (`suppressed`: ids never drawn), and log pi_T of each (pi_T over the whole
    vocabulary: suppression, top-k and top-p shape what is drawn, not the policy's
    probability). Order of the rule: suppress, temperature, top-k, top-p, draw."""
    scaled = logits.float()
    if not sampling.greedy and sampling.temperature != 1.0:
        scaled = scaled / sampling.temperature  # [N, V]
    peak = scaled.amax(dim=-1, keepdim=True)  # [N, 1]
    weights = torch.exp(scaled - peak)  # [N, V]
    log_norm = peak + weights.sum(dim=-1, keepdim=True).log()  # [N, 1]
    if suppressed is not None:
        # A sampled vision token (<|image_pad|>, ...) breaks the next forward pass: never drawn.
        weights[:, suppressed] = 0.0
    if sampling.greedy:
        tokens = weights.argmax(dim=-1)
    else:
        if sampling.top_k and sampling.top_k < weights.shape[-1]:
            kth = weights.topk(sampling.top_k, dim=-1).values[:, -1:]  # [N, 1]
            weights = weights.masked_fill(weights < kth, 0.0)
        if sampling.top_p < 1.0:
            weights = keep_top_p(weights, sampling.top_p)
        tokens = sample_categorical(weights)
    logprobs = scaled.gather(-1, tokens.unsqueeze(-1)) - log_norm  # [N, 1]
    return tokens, logprobs.squeeze(-1)


# ---------------------------------------------------------------- the Hugging Face engine


class _RoomyLayer(DynamicLayer):
    """A full-attention cache layer with room for the whole rollout allocated up front: each
    decoding step writes its token's keys/values in place (growing by concatenation would
    copy the whole cache at every token)."""

    def __init__(self, keys: Tensor, values: Tensor, room: int):
        super().__init__()
        n, heads, length, dim = keys.shape
        self.room_k, self.room_v = keys.new_empty(n, heads, length + room, dim), values.new_empty(n, heads, length + room, dim)
        self.room_k[..., :length, :], self.room_v[..., :length, :] = keys, values
        self.length, self.is_initialized = length, True
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = self.room_k[..., :length, :], self.room_v[..., :length, :]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        end = self.length + key_states.shape[-2]
        self.room_k[..., self.length:end, :], self.room_v[..., self.length:end, :] = key_states, value_states
        self.length = end
        self.keys, self.values = self.room_k[..., :end, :], self.room_v[..., :end, :]
        return self.keys, self.values


def decoding_cache(prefilled: DynamicCache, repeats: int, room: int) -> DynamicCache:
    """The prefilled prompts' cache, each prompt `repeats` times in a row, with room for
    `room` more tokens; layers of other kinds (sliding windows) are repeated as they are."""
    if not all(type(layer) is DynamicLayer for layer in prefilled.layers):
        prefilled.batch_repeat_interleave(repeats)
        return prefilled
    cache = DynamicCache()
    cache.layers = [_RoomyLayer(layer.keys.repeat_interleave(repeats, dim=0),
                                layer.values.repeat_interleave(repeats, dim=0), room) for layer in prefilled.layers]
    return cache


class HFEngine:
    """Generation with the training model's own weights, through Hugging Face forward calls."""

    holds_weights = False

    def __init__(self, adapter):
        self.adapter = adapter
        ids = sorted(set(adapter.suppressed_token_ids))
        self._suppressed = torch.tensor(ids, dtype=torch.long) if ids else None

    @torch.no_grad()
    def generate(self, prompts: list[EncodedPrompt], group_size: int, sampling: SamplingSettings) -> Generated:
        model, adapter = self.adapter.model, self.adapter
        device = next(model.parameters()).device
        batch = collate(prompts, adapter.pad_token_id).to(device)
        # Prefill once per prompt (image included), then G copies of its cache.
        prefilled = DynamicCache(config=model.config)
        out = model(**batch.model_inputs(), past_key_values=prefilled, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].repeat_interleave(group_size, dim=0)  # [N, V]
        n, p, t_max = logits.shape[0], batch.input_ids.shape[1], sampling.max_new_tokens
        cache = decoding_cache(prefilled, group_size, t_max)
        attention = torch.cat([batch.attention_mask.repeat_interleave(group_size, dim=0),
                               batch.attention_mask.new_ones(n, t_max)], dim=1)  # [N, P + T_max]
        start = batch.next_position.repeat_interleave(group_size)  # [N]
        eos = torch.tensor(adapter.eos_token_ids, device=device)
        suppressed = self._suppressed.to(device) if self._suppressed is not None else None
        ids = torch.full((n, t_max), adapter.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((n, t_max), dtype=torch.long, device=device)
        logprobs = torch.zeros((n, t_max), dtype=torch.float32, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        for t in range(t_max):
            tokens, lp = pick_tokens(logits, sampling, suppressed)
            ids[:, t] = tokens.masked_fill(done, adapter.pad_token_id)
            mask[:, t] = (~done).long()
            logprobs[:, t] = lp.masked_fill(done, 0.0)
            done |= torch.isin(tokens, eos)
            if bool(done.all()) or t + 1 == t_max:
                break
            positions = continued_positions(start, t, 1, batch.position_ids.shape[0])  # [A, N, 1]
            out = model(input_ids=ids[:, t:t + 1], attention_mask=attention[:, :p + t + 1],
                        position_ids=squeeze_axes(positions), past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1]
        length = t + 1
        return Generated(ids[:, :length].cpu(), mask[:, :length].cpu(), logprobs[:, :length].cpu())

    def sleep(self) -> None:
        """Nothing to free: the training model is the engine."""

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Nothing to load: the training model's weights are read in place."""


# ---------------------------------------------------------------- rollout and scoring


def encode_rows(adapter, task: Task, rows: list[Row]) -> list[EncodedPrompt]:
    """Each row's prompt and images, encoded once (each image opened and decoded once)."""
    return adapter.encode_batch([task.prompt(row) for row in rows], [task.images(row) for row in rows])


def rollout(engine: Engine, adapter, rows: list[Row], prompts: list[EncodedPrompt], group_size: int,
            sampling: SamplingSettings) -> Rollout:
    """`group_size` completions of each encoded prompt, decoded for the reward."""
    out = engine.generate(prompts, group_size, sampling)
    texts = adapter.decode(out.completion_ids, out.completion_mask)
    return Rollout(rows, prompts, out.completion_ids, out.completion_mask, out.logprobs, texts)


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
