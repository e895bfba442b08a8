"""Log-probabilities of a micro-batch's completions, with each prompt computed once per group.

The G completions of a group share their prompt, image included. The plain way (every
completion as its own prompt + completion sequence) runs the vision tower and every prompt
token G times. Here, in one forward call:

    prompt pass:      B prompts (images once)        -> hidden state of each prompt's last
                                                         token, and each layer's keys/values
    completion pass:  N = B * G completions          -> attend to their prompt's keys/values,
                                                         repeated G times (not recomputed)
    LM head:          chunk by chunk over positions  -> float32 log-probs [N, T]; the
                                                         [N, T, V] logits never exist at once

The gradient reaches the prompt (and the vision tower) once, summed over its G completions,
through the repeated keys/values. Both passes keep working under gradient checkpointing: the
caches below never change what they hold once read, so a recomputed layer reads and writes
the same states. (Both passes say use_cache=False: a layer writes into whatever cache it is
given, and the flag only stops the model making one of its own or warning about
checkpointing.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from gpg_vl.models.base import PromptBatch, continued_positions, squeeze_axes


class _RecordingLayer(DynamicLayer):
    """Keeps the keys/values of the one pass that writes it (a recomputation overwrites them
    with equal values instead of appending)."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0  # the pass that writes it starts from an empty cache


class _PrefixLayer(DynamicLayer):
    """Read-only prompt keys/values in front of whatever is attended next."""

    def __init__(self, keys: Tensor, values: Tensor):
        super().__init__()
        self.keys, self.values, self.is_initialized = keys, values, True
        self.dtype, self.device = keys.dtype, keys.device

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def recording_cache(num_layers: int) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [_RecordingLayer() for _ in range(num_layers)]
    return cache


def prefix_cache(recorded: DynamicCache, repeats: int) -> DynamicCache:
    """Each prompt's keys/values `repeats` times in a row (a group's G completions)."""
    cache = DynamicCache()
    cache.layers = [_PrefixLayer(layer.keys.repeat_interleave(repeats, dim=0),
                                 layer.values.repeat_interleave(repeats, dim=0)) for layer in recorded.layers]
    return cache


def token_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[ids] in float32: [N, C, V], [N, C] -> [N, C]."""
    logits = logits.float() / temperature  # [N, C, V]
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [N, C]
    return picked - torch.logsumexp(logits, dim=-1)  # [N, C]


def _head_logprobs(head: nn.Module, hidden: Tensor, ids: Tensor, temperature: float) -> Tensor:
    return token_logprobs(head(hidden), ids, temperature)


def chunked_head_logprobs(head: nn.Module, hidden: Tensor, ids: Tensor, chunk_size: int,
                          temperature: float = 1.0) -> Tensor:
    """log-probs of `ids` [N, T] from the hidden states that predict them [N, T, H], the LM
    head applied `chunk_size` positions at a time. Under autograd each chunk is checkpointed,
    so the backward pass too holds one chunk's [N, chunk, V] logits at a time."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    out = []
    for start in range(0, ids.shape[1], chunk_size):
        part, part_ids = hidden[:, start:start + chunk_size], ids[:, start:start + chunk_size]
        if torch.is_grad_enabled() and part.requires_grad:
            out.append(checkpoint(_head_logprobs, head, part, part_ids, temperature, use_reentrant=False))
        else:
            out.append(_head_logprobs(head, part, part_ids, temperature))
    return torch.cat(out, dim=1)  # [N, T]


def _layers_keep_cache(model: nn.Module, keep: bool) -> list[tuple[nn.Module, object]]:
    """Let checkpointed decoder layers pass the cache through (ours are safe to recompute);
    returns what to restore."""
    changed = []
    for module in model.modules():
        if hasattr(module, "_can_checkpoint_with_cache"):
            changed.append((module, module.__dict__.get("_can_checkpoint_with_cache")))
            module._can_checkpoint_with_cache = keep
    return changed


def _restore(changed: list[tuple[nn.Module, object]]) -> None:
    for module, before in changed:
        if before is None:
            del module._can_checkpoint_with_cache
        else:
            module._can_checkpoint_with_cache = before


class PolicyLogprobs(nn.Module):
    """A causal LM (or VLM) whose forward returns completion log-probs, each prompt computed
    once per group. Wrapped by DDP or DeepSpeed in training: one call per micro-batch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, prompts: PromptBatch, completion_ids: Tensor, completion_mask: Tensor, group_size: int,
                chunk_size: int = 16, temperature: float = 1.0) -> Tensor:
        """log pi_T(o_t | prompt, o_<t) of each completion token, float32 [N, T], 0 where the
        mask is 0; pi_T = softmax(logits / temperature), the distribution the completions were
        sampled from. prompts: B prompts; completions [N, T] with N = B * group_size, group
        by group."""
        body, head = self.model.base_model, self.model.get_output_embeddings()
        layers = self.model.config.get_text_config().num_hidden_layers
        changed = _layers_keep_cache(self.model, True)
        try:
            recorded = recording_cache(layers)
            prompt_out = body(**prompts.model_inputs(), past_key_values=recorded, use_cache=False)
            last = prompt_out.last_hidden_state[:, -1:]  # [B, 1, H] predicts each first completion token
            n, t = completion_ids.shape
            attention = torch.cat([prompts.attention_mask.repeat_interleave(group_size, dim=0),
                                   completion_mask.to(prompts.attention_mask.dtype)], dim=1)  # [N, P+T]
            start = prompts.next_position.repeat_interleave(group_size)  # [N]
            positions = continued_positions(start, 0, t, prompts.position_ids.shape[0])  # [A, N, T]
            completion_out = body(input_ids=completion_ids, attention_mask=attention,
                                  position_ids=squeeze_axes(positions),
                                  past_key_values=prefix_cache(recorded, group_size), use_cache=False)
        finally:
            _restore(changed)
        # Position t's token is predicted by the hidden state one position earlier.
        hidden = torch.cat([last.repeat_interleave(group_size, dim=0),
                            completion_out.last_hidden_state[:, :-1]], dim=1)  # [N, T, H]
        logprobs = chunked_head_logprobs(head, hidden, completion_ids, chunk_size, temperature)  # [N, T]
        return logprobs * completion_mask.to(logprobs.dtype)
