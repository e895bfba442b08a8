"""GPG and its baselines as pure tensor functions (no models, no tasks, no distributed calls).

Notation (GPG, arXiv 2504.02546): N = B * G completions per batch, B groups of G samples of
one prompt each, T completion positions. `completion_mask` is 1 on every generated token up
to and including the first EOS.

GPG (the final version of the reference):
    A_i    = (r_i - mean_group(r)) / F_norm,     F_norm = 1 (default) or std_group + 1e-4
    L      = -(1 / inverse_alpha) * agg_{i,t}( m_{i,t} * A_i * log pi(o_{i,t}) )
    inverse_alpha = min(1, n_valid / B),  i.e. alpha = B / (B - M)
No importance ratio, no clipping, no reference model, no KL.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

Algorithm = Literal["gpg", "grpo", "dr_grpo"]
AdvantageNorm = Literal["none", "std"]
Aggregation = Literal["token", "sequence", "constant"]

ALGORITHMS = ("gpg", "grpo", "dr_grpo")
ADVANTAGE_NORMS = ("none", "std")
AGGREGATIONS = ("token", "sequence", "constant")

# The defaults each algorithm brings when a setting is left unset.
DEFAULTS: dict[str, dict] = {
    # GPG: F_norm = 1 (paper's best), sequence mean as in the reference's vision runs (its
    # text math runs used "token"), alpha on, beta_th 0.4 as in its vision scripts (0.5 in its
    # 7B math script): a text-math preset sets loss_aggregation and beta_th explicitly.
    "gpg": {"advantage_norm": "none", "loss_aggregation": "sequence", "alpha_correction": True, "beta_th": 0.4},
    # GRPO (DeepSeekMath): std-scaled advantages, sequence mean, no alpha, no resampling.
    "grpo": {"advantage_norm": "std", "loss_aggregation": "sequence", "alpha_correction": False, "beta_th": 0.0},
    # Dr. GRPO (Liu et al. 2025): no std scaling, token sum over a constant.
    "dr_grpo": {"advantage_norm": "none", "loss_aggregation": "constant", "alpha_correction": False, "beta_th": 0.0},
}

STD_EPS = 1e-4


class LossStats(NamedTuple):
    """Diagnostics of one loss call (detached scalars)."""

    pg_loss: Tensor
    kl: Tensor
    clip_fraction: Tensor


def group_advantages(rewards: Tensor, group_size: int, norm: AdvantageNorm = "none") -> Tensor:
    """A_i = r_i - mean of its group, divided by (unbiased std + 1e-4) when norm == "std".

    rewards: [B*G] ordered group by group. Returns [B*G]. Sums to zero within each group.
    """
    grouped = rewards.view(-1, group_size)  # [B, G]
    adv = grouped - grouped.mean(dim=1, keepdim=True)  # [B, G]
    if norm == "std":
        std = grouped.std(dim=1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(adv)
        adv = adv / (std + STD_EPS)
    elif norm != "none":
        raise ValueError(f"advantage norm must be one of {ADVANTAGE_NORMS}, got {norm!r}")
    # The mean of equal floats can differ from them in the last bit: an invalid group gets
    # exactly zero advantage, as the method says, not rounding noise.
    adv = adv * valid_groups(rewards, group_size).unsqueeze(1)  # [B, G]
    return adv.reshape(-1)  # [B*G]


def valid_groups(rewards: Tensor, group_size: int) -> Tensor:
    """A group is valid when its rewards are not all equal (its std > 0). Returns bool [B].

    Compared exactly (max > min): a group of equal rewards has exactly zero advantages,
    so it carries no gradient whatever the normalisation.
    """
    grouped = rewards.view(-1, group_size)  # [B, G]
    return grouped.amax(dim=1) > grouped.amin(dim=1)  # [B]


def inverse_alpha(n_valid: int, n_groups: int) -> float:
    """min(1, n_valid / B), counts taken over all ranks of what is really trained.

    The loss is divided by it, i.e. multiplied by alpha = B / (B - M) (GPG section 3.2).
    With no valid group every advantage is zero and so is the gradient; 1 is returned to
    keep the loss finite (0 * inf would be NaN).
    """
    if n_groups <= 0:
        raise ValueError("n_groups must be positive")
    if n_valid <= 0:
        return 1.0
    return min(1.0, n_valid / n_groups)


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over positions where mask is 1; 0 where there are none."""
    return masked_sum(values, mask, dim) / mask.sum(dim=dim).clamp(min=1)


def aggregate(per_token: Tensor, mask: Tensor, how: Aggregation, constant: float | None = None) -> Tensor:
    """Reduce a [N, T] per-token loss to a scalar.

    - "token":    sum_{i,t} m x / sum_{i,t} m               (DAPO; GPG's text math runs)
    - "sequence": mean_i( sum_t m x / sum_t m )             (GRPO; GPG's vision runs)
    - "constant": sum_{i,t} m x / (N * constant)            (Dr. GRPO; constant = max completion length)
    """
    if how == "token":
        return masked_mean(per_token, mask)
    if how == "sequence":
        return masked_mean(per_token, mask, dim=1).mean()
    if how == "constant":
        if not constant or constant <= 0:
            raise ValueError("the 'constant' aggregation needs a positive constant (max completion length)")
        return masked_sum(per_token, mask) / (per_token.shape[0] * constant)
    raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {how!r}")


def gpg_loss(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    inv_alpha: float = 1.0,
    aggregation: Aggregation = "sequence",
    constant: float | None = None,
) -> tuple[Tensor, LossStats]:
    """GPG: plain REINFORCE with a group-mean baseline, scaled by alpha = 1 / inv_alpha.

    logprobs [N, T] (with grad), advantages [N], mask [N, T].
    """
    # GPG eq. (5): no ratio, no clip, no KL -- the policy gradient of the log-likelihood.
    per_token = -advantages.unsqueeze(1) * logprobs  # [N, T]
    pg = aggregate(per_token, mask, aggregation, constant)
    # GPG section 3.2: undo the shrinking of the mean gradient by zero-advantage groups.
    loss = pg / inv_alpha
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    return loss, LossStats(pg.detach(), zero, zero)


def grpo_loss(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    clip_eps: float = 0.2,
    kl_coef: float = 0.0,
    aggregation: Aggregation = "sequence",
    constant: float | None = None,
    inv_alpha: float = 1.0,
) -> tuple[Tensor, LossStats]:
    """GRPO / Dr. GRPO surrogate: clipped importance ratio, optional k3 KL to a reference.

    With one optimizer step per generated batch, old_logprobs equal logprobs (ratio 1) and
    the gradient equals REINFORCE's; the ratio path is kept for comparisons.
    logprobs, old_logprobs, ref_logprobs: [N, T]; advantages [N]; mask [N, T].
    """
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    ratio = torch.exp(logprobs - old)  # [N, T]
    adv = advantages.unsqueeze(1)  # [N, 1]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)  # [N, T]
    clip_fraction = masked_mean((clipped < unclipped).to(logprobs.dtype), mask).detach()
    kl = torch.zeros_like(per_token)
    if kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs reference log-probs")
        # k3 estimator of KL(pi || ref) (Schulman 2020), as GRPO uses.
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1.0  # [N, T]
    pg = aggregate(per_token, mask, aggregation, constant)
    kl_term = aggregate(kl, mask, aggregation, constant)
    loss = (pg + kl_coef * kl_term) / inv_alpha
    return loss, LossStats(pg.detach(), kl_term.detach(), clip_fraction)


def policy_loss(
    algorithm: Algorithm,
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    inv_alpha: float = 1.0,
    aggregation: Aggregation = "sequence",
    constant: float | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    clip_eps: float = 0.2,
    kl_coef: float = 0.0,
) -> tuple[Tensor, LossStats]:
    """Dispatch on the algorithm name; GPG never sees a ratio, a clip or a reference."""
    if algorithm == "gpg":
        return gpg_loss(logprobs, advantages, mask, inv_alpha, aggregation, constant)
    if algorithm in ("grpo", "dr_grpo"):
        return grpo_loss(logprobs, advantages, mask, old_logprobs, ref_logprobs, clip_eps, kl_coef,
                         aggregation, constant, inv_alpha)
    raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
