"""The algorithm module against values derived by hand (float64, tolerance 1e-6)."""

import math

import pytest
import torch

from gpg_vl import algorithm as alg

f64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=f64)


def test_group_advantages_mean_baseline():
    # group 1: rewards 1, 0, 0, 1 -> mean 0.5 -> A = 0.5, -0.5, -0.5, 0.5
    # group 2: rewards 2, 2, 2, 2 -> mean 2 -> A = 0 (an invalid group)
    adv = alg.group_advantages(t([1, 0, 0, 1, 2, 2, 2, 2]), 4)
    torch.testing.assert_close(adv, t([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]), atol=1e-6, rtol=0)


def test_group_advantages_std():
    # rewards 1, 0, 0, 1: mean 0.5, unbiased std = sqrt((4 * 0.25) / 3) = sqrt(1/3) = 0.577350...
    # A = +-0.5 / (0.5773503 + 1e-4) = +-0.8658755
    std = math.sqrt(1 / 3)
    adv = alg.group_advantages(t([1, 0, 0, 1]), 4, "std")
    expect = 0.5 / (std + 1e-4)
    torch.testing.assert_close(adv, t([expect, -expect, -expect, expect]), atol=1e-6, rtol=0)


def test_valid_groups_and_inverse_alpha():
    rewards = t([1, 0, 1, 1, 0.5, 0.5, 0, 0, 2, 1, 1, 1])
    valid = alg.valid_groups(rewards, 3)  # groups (1,0,1) (1,.5,.5) (0,0,2) (1,1,1)
    assert valid.tolist() == [True, True, True, False]
    # B = 4, M = 1: inverse_alpha = 3/4, alpha = B / (B - M) = 4/3
    assert alg.inverse_alpha(3, 4) == pytest.approx(0.75, abs=1e-12)
    assert 1 / alg.inverse_alpha(3, 4) == pytest.approx(4 / 3, abs=1e-12)
    assert alg.inverse_alpha(4, 4) == 1.0
    assert alg.inverse_alpha(9, 4) == 1.0  # min(1, .): more valid than trained never scales down
    assert alg.inverse_alpha(0, 4) == 1.0  # no gradient anyway; the loss must stay finite


@pytest.mark.parametrize("B,M", [(8, 0), (8, 3), (16, 15), (5, 2)])
def test_alpha_is_b_over_b_minus_m(B, M):
    assert 1 / alg.inverse_alpha(B - M, B) == pytest.approx(B / (B - M), rel=1e-12)


def _hand_case():
    # 2 sequences; sequence 0 has 3 real tokens, sequence 1 has 1 (then padding).
    logp = t([[-1.0, -2.0, -0.5, -9.0], [-0.25, -7.0, -7.0, -7.0]]).requires_grad_()
    adv = t([0.5, -1.0])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    return logp, adv, mask


def test_gpg_loss_token_mean_by_hand():
    logp, adv, mask = _hand_case()
    # per-token -A*logp: seq0: 0.5, 1.0, 0.25 ; seq1: -0.25. token mean = (1.75 - 0.25) / 4 = 0.375
    # inverse_alpha 0.75 -> loss = 0.375 / 0.75 = 0.5
    loss, stats = alg.gpg_loss(logp, adv, mask, inv_alpha=0.75, aggregation="token")
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    assert stats.pg_loss.item() == pytest.approx(0.375, abs=1e-6)
    loss.backward()
    # d loss / d logp[i,t] = -A_i * m / (4 * 0.75)
    expect = t([[-0.5 / 3, -0.5 / 3, -0.5 / 3, 0], [1 / 3, 0, 0, 0]])
    torch.testing.assert_close(logp.grad, expect, atol=1e-6, rtol=0)


def test_gpg_loss_sequence_mean_by_hand():
    logp, adv, mask = _hand_case()
    # seq0 mean = 1.75 / 3 = 0.583333, seq1 mean = -0.25 ; mean = 0.3333333/2 = 0.1666667
    loss, _ = alg.gpg_loss(logp, adv, mask, inv_alpha=1.0, aggregation="sequence")
    assert loss.item() == pytest.approx((1.75 / 3 - 0.25) / 2, abs=1e-6)


def test_dr_grpo_constant_by_hand():
    logp, adv, mask = _hand_case()
    # ratio = 1 (no old log-probs): per-token surrogate -A * 1 -> seq0: 3 * -0.5, seq1: +1.0
    # token sum -0.5 over N * constant = 2 * 8 -> -0.03125
    loss, _ = alg.policy_loss("dr_grpo", logp, adv, mask, aggregation="constant", constant=8)
    assert loss.item() == pytest.approx(-0.5 / 16, abs=1e-6)
    loss.backward()
    # d/dlogp of -A * exp(logp - sg(logp)) = -A: seq0 -0.5/16 on 3 tokens, seq1 +1/16 on 1
    expect = t([[-0.5 / 16] * 3 + [0], [1 / 16, 0, 0, 0]])
    torch.testing.assert_close(logp.grad, expect, atol=1e-6, rtol=0)


def test_grpo_clipped_ratio_and_kl_by_hand():
    logp = t([[-1.0, -1.0]]).requires_grad_()
    old = t([[-1.5, -0.5]])  # ratio = e^{0.5} = 1.648721, e^{-0.5} = 0.606531
    ref = t([[-1.0, -2.0]])
    adv = t([2.0])
    mask = t([[1, 1]])
    # A > 0: min(r A, clip(r, .8, 1.2) A) -> token0: min(3.297443, 2.4) = 2.4 ; token1: min(1.213061, 1.6) = 1.213061
    # pg = -(2.4 + 1.213061) / 2 = -1.8065307
    # k3 KL: d = ref - logp = (0, -1): exp(d) - d - 1 = (0, e^-1) = (0, 0.3678794) -> mean 0.1839397
    loss, stats = alg.policy_loss("grpo", logp, adv, mask, old_logprobs=old, ref_logprobs=ref,
                                  clip_eps=0.2, kl_coef=0.1, aggregation="sequence")
    pg = -(2.4 + 2 * math.exp(-0.5)) / 2
    kl = math.exp(-1) / 2
    assert stats.pg_loss.item() == pytest.approx(pg, abs=1e-6)
    assert stats.kl.item() == pytest.approx(kl, abs=1e-6)
    assert loss.item() == pytest.approx(pg + 0.1 * kl, abs=1e-6)
    assert stats.clip_fraction.item() == pytest.approx(0.5, abs=1e-6)


def test_grpo_without_old_logprobs_has_reinforce_gradient():
    # ratio 1: gradient of -mean(A * ratio) equals that of -mean(A * logp)
    logp, adv, mask = _hand_case()
    loss, _ = alg.policy_loss("grpo", logp, adv, mask, aggregation="token")
    loss.backward()
    g1 = logp.grad.clone()
    logp2, _, _ = _hand_case()
    alg.gpg_loss(logp2, adv, mask, aggregation="token")[0].backward()
    torch.testing.assert_close(g1, logp2.grad, atol=1e-12, rtol=0)


# ---- properties -------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["none", "std"])
def test_advantages_sum_to_zero_per_group(norm):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(6 * 8, generator=g, dtype=f64)
    adv = alg.group_advantages(rewards, 8, norm).view(6, 8)
    torch.testing.assert_close(adv.sum(1), torch.zeros(6, dtype=f64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("how", ["token", "sequence", "constant"])
@pytest.mark.parametrize("algorithm", ["gpg", "grpo", "dr_grpo"])
def test_all_equal_group_gives_exactly_zero_gradient(how, algorithm):
    g = torch.Generator().manual_seed(1)
    rewards = t([1, 0, 1, 0, 0.7, 0.7, 0.7, 0.7])  # group 2 is all-equal
    adv = alg.group_advantages(rewards, 4, "std" if algorithm == "grpo" else "none")
    logp = (-torch.rand(8, 5, generator=g, dtype=f64)).requires_grad_()
    mask = torch.ones(8, 5, dtype=f64)
    loss, _ = alg.policy_loss(algorithm, logp, adv, mask, aggregation=how, constant=5, inv_alpha=0.5)
    loss.backward()
    assert torch.equal(logp.grad[4:], torch.zeros(4, 5, dtype=f64))
    assert logp.grad[:4].abs().sum() > 0


@pytest.mark.parametrize("norm", ["none", "std"])
def test_all_equal_group_has_exactly_zero_advantage_despite_rounding(norm):
    # mean of eight 0.1 is 0.09999999999999999 in float64: without masking, A would be ~1e-17
    # (and ~7e-5 once divided by std + 1e-4 in float32).
    for dtype in (torch.float32, torch.float64):
        adv = alg.group_advantages(torch.full((8,), 0.1, dtype=dtype), 8, norm)
        assert torch.equal(adv, torch.zeros(8, dtype=dtype))


@pytest.mark.parametrize("how", ["token", "sequence", "constant"])
def test_padding_does_not_change_the_loss(how):
    logp, adv, mask = _hand_case()
    base, _ = alg.gpg_loss(logp, adv, mask, aggregation=how, constant=8)
    padded_logp = torch.cat([logp.detach(), t([[-3.0, -4.0], [-5.0, -6.0]])], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 2, dtype=f64)], dim=1)
    more, _ = alg.gpg_loss(padded_logp, adv, padded_mask, aggregation=how, constant=8)
    assert more.item() == pytest.approx(base.item(), abs=1e-12)


def test_alpha_scales_the_gradient_by_b_over_b_minus_m():
    # B = 4 groups of 2, M = 1 invalid: the loss is multiplied by 4/3 exactly.
    rewards = t([1, 0, 0, 1, 1, 1, 0, 1])
    adv = alg.group_advantages(rewards, 2)
    n_valid = int(alg.valid_groups(rewards, 2).sum())
    assert n_valid == 3
    logp = -torch.rand(8, 3, dtype=f64, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(8, 3, dtype=f64)
    plain, _ = alg.gpg_loss(logp, adv, mask, inv_alpha=1.0)
    scaled, _ = alg.gpg_loss(logp, adv, mask, inv_alpha=alg.inverse_alpha(n_valid, 4))
    assert scaled.item() == pytest.approx(plain.item() * 4 / 3, abs=1e-12)


def test_bad_settings_raise():
    logp, adv, mask = _hand_case()
    with pytest.raises(ValueError):
        alg.aggregate(logp, mask, "tokens")
    with pytest.raises(ValueError):
        alg.aggregate(logp, mask, "constant")
    with pytest.raises(ValueError):
        alg.policy_loss("ppo", logp, adv, mask)
    with pytest.raises(ValueError):
        alg.group_advantages(t([1, 0]), 2, "rms")
