"""Text objectives of the seed papers (llm_rl/objectives.py, METHODS.md B.1-B.6, B.14).

Every expected value is computed by hand (arithmetic in comments) or by a plain python-loop reference
written here; the code under test is never compared with itself.
"""

from __future__ import annotations

import math

import pytest
import torch

import llm_rl  # noqa: F401  (registers the text objectives)
from llm_rl.objectives import (
    alol,
    asft,
    copg,
    dft,
    dpo,
    ift,
    ift_weights,
    modpo,
    nft,
    sft,
)
from shared.advantages import dr_grpo
from shared.aggregation import LOSS_AGG_MODES, StepNorm
from shared.config import AlgorithmConfig
from shared.objectives import OBJECTIVES, ppo_clip

F64 = torch.float64


def _t(x):
    return torch.tensor(x, dtype=F64)


def _leaf(x):
    return (x if isinstance(x, torch.Tensor) else _t(x)).detach().clone().requires_grad_(True)


def _grad(fn, logp, *args, **kw):
    """(loss, metrics, d loss / d logp) of objective `fn` for a fresh leaf copy of logp."""
    lp = _leaf(logp)
    loss, metrics = fn(lp, *args, **kw)
    (g,) = torch.autograd.grad(loss, lp, allow_unused=True)
    return loss.detach(), metrics, (torch.zeros_like(lp) if g is None else g)


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def test_registry():
    for name, fn in {"nft": nft, "copg": copg, "dpo": dpo, "modpo": modpo, "alol": alol, "sft": sft,
                     "dft": dft, "asft": asft, "ift": ift}.items():
        assert OBJECTIVES[name] is fn
    for fn in (nft, copg, dpo, modpo):
        assert fn.needs_whole_groups


# ============================================================================================ NFT
# Three groups of 4 with 1, 2, 3 correct (r-hat 0.25, 0.5, 0.75), group ids interleaved.
NFT_GIDS = torch.tensor([5, 2, 9, 5, 2, 9, 5, 2, 9, 5, 2, 9])
NFT_REWARDS = _t([1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 0, 1])
#   group 5 (positions 0,3,6,9):  rewards 1,0,0,0 -> r-hat 1/4
#   group 2 (positions 1,4,7,10): rewards 0,1,1,0 -> r-hat 2/4
#   group 9 (positions 2,5,8,11): rewards 1,1,0,1 -> r-hat 3/4
NFT_RHAT = {5: 0.25, 2: 0.5, 9: 0.75}


def _nft_batch(T=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B = len(NFT_GIDS)
    mask = torch.ones(B, T, dtype=F64)
    for i in range(B):
        mask[i, 1 + i % T:] = 0.0  # lengths 1..T, trailing padding
    old = -torch.rand(B, T, generator=gen, dtype=F64) * 2 - 0.1
    return old, mask


@pytest.mark.parametrize("loss_agg", LOSS_AGG_MODES)
def test_nft_gradient_at_ratio_one_equals_dr_grpo(loss_agg):
    # At R = 1: positives get -(1 - r-hat) grad log pi, negatives +r-hat grad log pi, i.e. GRPO's
    # gradient -A grad log pi with A = r - r-hat (Dr. GRPO). First check the Dr. GRPO advantages by hand:
    #   group 5: 1 - .25 = .75, 0 - .25 = -.25;  group 2: +-.5;  group 9: .25, -.75
    adv = dr_grpo(NFT_REWARDS, NFT_GIDS)
    hand = [r - NFT_RHAT[int(g)] for r, g in zip(NFT_REWARDS.tolist(), NFT_GIDS.tolist())]
    torch.testing.assert_close(adv, _t(hand))
    old, mask = _nft_batch()
    norm = StepNorm.of(mask, norm_len=5.0)
    cfg = AlgorithmConfig(objective="nft", loss_agg=loss_agg, nft_weighting="one_minus_rhat")
    _, _, g_nft = _grad(nft, old, old, None, adv, mask, cfg, norm, group_ids=NFT_GIDS, rewards=NFT_REWARDS)
    _, _, g_ppo = _grad(ppo_clip, old, old, None, adv, mask, cfg, norm)
    torch.testing.assert_close(g_nft, g_ppo, rtol=1e-10, atol=1e-12)
    assert g_nft.abs().sum() > 0


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_nft_std_weighting_equals_std_normalised_grpo(loss_agg):
    # normalize=2: w = sqrt((1 - r-hat) / r-hat); at R = 1 this is GRPO with A = (r - r-hat) / sqrt(r-hat (1 - r-hat))
    # (population std of 0/1 rewards with fraction r-hat correct), computed here with a python loop.
    adv = []
    for r, g in zip(NFT_REWARDS.tolist(), NFT_GIDS.tolist()):
        rh = NFT_RHAT[g]
        adv.append((r - rh) / math.sqrt(rh * (1 - rh)))
    adv = _t(adv)
    # e.g. group 5 positive: .75 / sqrt(.25 * .75) = sqrt(3) = 1.7320508
    assert adv[0].item() == pytest.approx(math.sqrt(3))
    old, mask = _nft_batch(seed=1)
    norm = StepNorm.of(mask)
    cfg = AlgorithmConfig(objective="nft", loss_agg=loss_agg, nft_weighting="std")
    _, _, g_nft = _grad(nft, old, old, None, adv, mask, cfg, norm, group_ids=NFT_GIDS, rewards=NFT_REWARDS)
    _, _, g_ppo = _grad(ppo_clip, old, old, None, adv, mask, cfg, norm)
    torch.testing.assert_close(g_nft, g_ppo, rtol=1e-10, atol=1e-12)


def _nft_single_negative(delta, clamp):
    """One group of 4 with rewards 1,1,0,0 (r-hat 0.5, w = 0.5); only token (2, 0) (a negative) is trained."""
    old = _t([[-1.0, -2.0], [-0.5, -0.7], [-1.2, -0.3], [-0.9, -1.1]])
    logp = old.clone()
    logp[2, 0] += delta
    logp[0, 0] += 0.4  # positive / masked tokens off-ratio too: they must not count
    mask = torch.zeros(4, 2, dtype=F64)
    mask[2, 0] = 1.0
    cfg = AlgorithmConfig(objective="nft", nft_clamp=clamp, loss_agg="token_mean")
    return _grad(nft, logp, old, None, _t([0.0] * 4), mask, cfg, StepNorm.of(mask),
                 group_ids=torch.tensor([0, 0, 0, 0]), rewards=_t([1.0, 1.0, 0.0, 0.0]))


def test_nft_negative_token_clipped_hand():
    # R = e^0.2 = 1.2214028;  x = (1 - 0.5 R) / (1 - 0.5) = 2 - R = 0.7785972 < clamp 0.9
    # value: l = -log(max(x, 0.9)) = -log 0.9 = 0.1053605;  loss = w * l / 1 token = 0.5 * 0.1053605
    # gradient: d l / d logp = -(dx/dlogp) / 0.9, dx/dlogp = -r-hat R / (1 - r-hat) = -R
    #           -> 0.5 * R / 0.9 = 0.6785571
    R = math.exp(0.2)
    loss, m, g = _nft_single_negative(0.2, 0.9)
    assert loss.item() == pytest.approx(0.5 * -math.log(0.9), rel=1e-12)
    expected = torch.zeros(4, 2, dtype=F64)
    expected[2, 0] = 0.5 * R / 0.9
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14)
    assert m["nft_clamped_frac"].item() == pytest.approx(1.0)
    assert m["nft_rhat"].item() == pytest.approx(0.5)


def test_nft_negative_token_x_negative_stays_finite():
    # R = e^1 = 2.7182818: x = 2 - R = -0.7182818 (pi^- would be negative) -> value -log 0.9, grad 0.5 R / 0.9
    R = math.e
    loss, _, g = _nft_single_negative(1.0, 0.9)
    assert loss.item() == pytest.approx(0.5 * -math.log(0.9), rel=1e-12)
    assert g[2, 0].item() == pytest.approx(0.5 * R / 0.9, rel=1e-12)


def test_nft_negative_token_unclipped_hand():
    # R = e^-0.3 = 0.7408182;  x = 2 - R = 1.2591818 > 0.9
    # value: l = -log x = -0.2304... ; loss = 0.5 * l
    # gradient: -(dx/dlogp) / x = R / x = 0.5883294 ; times w = 0.5
    R = math.exp(-0.3)
    x = 2.0 - R
    loss, m, g = _nft_single_negative(-0.3, 0.9)
    assert loss.item() == pytest.approx(0.5 * -math.log(x), rel=1e-12)
    assert g[2, 0].item() == pytest.approx(0.5 * R / x, rel=1e-12)
    assert g.abs().sum().item() == pytest.approx(0.5 * R / x, rel=1e-12)
    assert m["nft_clamped_frac"].item() == 0.0


def test_nft_positive_token_hand():
    # positive token with R = e^0.4: l = -log R = -0.4;  w = 0.5;  grad = -w = -0.5
    old = _t([[-1.0], [-0.5], [-1.2], [-0.9]])
    logp = old.clone()
    logp[0, 0] += 0.4
    mask = _t([[1.0], [0.0], [0.0], [0.0]])
    cfg = AlgorithmConfig(objective="nft")
    loss, _, g = _grad(nft, logp, old, None, _t([0.0] * 4), mask, cfg, StepNorm.of(mask),
                       group_ids=torch.tensor([0, 0, 0, 0]), rewards=_t([1.0, 1.0, 0.0, 0.0]))
    assert loss.item() == pytest.approx(0.5 * -0.4, rel=1e-12)
    assert g[0, 0].item() == pytest.approx(-0.5, rel=1e-12)


@pytest.mark.parametrize("weighting", ["one_minus_rhat", "std"])
def test_nft_uninformative_groups_contribute_nothing(weighting):
    # group 0 all correct, group 1 all wrong: weight 0 -> zero loss, zero gradient, even off-policy
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(8, 3, generator=gen, dtype=F64) - 0.1
    logp = old + 0.3 * torch.randn(8, 3, generator=gen, dtype=F64)
    mask = torch.ones(8, 3, dtype=F64)
    gids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    rewards = _t([1, 1, 1, 1, 0, 0, 0, 0])
    cfg = AlgorithmConfig(objective="nft", nft_weighting=weighting)
    loss, _, g = _grad(nft, logp, old, None, _t([0.0] * 8), mask, cfg, StepNorm.of(mask),
                       group_ids=gids, rewards=rewards)
    assert loss.item() == 0.0
    assert torch.equal(g, torch.zeros_like(g))
    # next to an informative group they still get no gradient
    gids2 = torch.cat([gids, torch.tensor([2, 2, 2, 2])])
    rewards2 = torch.cat([rewards, _t([1, 0, 0, 1])])
    logp2 = torch.cat([logp, logp[:4] - 0.2])
    old2 = torch.cat([old, old[:4]])
    mask2 = torch.ones(12, 3, dtype=F64)
    loss2, _, g2 = _grad(nft, logp2, old2, None, _t([0.0] * 12), mask2, cfg, StepNorm.of(mask2),
                         group_ids=gids2, rewards=rewards2)
    assert torch.equal(g2[:8], torch.zeros(8, 3, dtype=F64))
    assert g2[8:].abs().sum() > 0 and loss2.item() != 0.0


def test_nft_missing_group_ids_raises():
    mask = torch.ones(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="group_ids"):
        nft(mask, mask, None, _t([0, 0]), mask, AlgorithmConfig(), StepNorm.of(mask), rewards=_t([1, 0]))


# ======================================================================================= DPO / IPO
# Two preference pairs (groups 10 and 3); T = 3 with padding; beta = 0.5.
#   a (g10, chosen):   logp - ref = [0.2, -0.5, 0.2]          mask 111 -> h_a = -0.1
#   b (g10, rejected): logp - ref = [0.2, 0.5, (-6.0 masked)] mask 110 -> h_b =  0.7
#   c (g3, chosen):    logp - ref = [0.6, 0.1, 0.0]           mask 111 -> h_c =  0.7
#   d (g3, rejected):  logp - ref = [-0.5, masked, masked]    mask 100 -> h_d = -0.5
# margins: g10: h_a - h_b = -0.8;  g3: h_c - h_d = 1.2
PREF = {
    "a": ([-1.0, -2.0, -0.5], [-1.2, -1.5, -0.7], [1, 1, 1], 10, 1.0),
    "b": ([-0.8, -1.1, -9.0], [-1.0, -1.6, -3.0], [1, 1, 0], 10, 0.0),
    "c": ([-0.3, -0.4, -0.6], [-0.9, -0.5, -0.6], [1, 1, 1], 3, 1.0),
    "d": ([-2.0, -5.0, -1.0], [-1.5, -2.0, -5.0], [1, 0, 0], 3, 0.0),
}
H = {"a": -0.1, "b": 0.7, "c": 0.7, "d": -0.5}


def _pref_batch(order, extra=None):
    rows = [PREF[k] for k in order]
    logp = _t([r[0] for r in rows])
    ref = _t([r[1] for r in rows])
    mask = _t([r[2] for r in rows])
    gids = torch.tensor([r[3] for r in rows])
    rewards = _t([r[4] for r in rows])
    return logp, ref, mask, gids, rewards


def _hand_pref(kind, beta):
    m10, m3 = H["a"] - H["b"], H["c"] - H["d"]  # -0.8, 1.2
    if kind == "sigmoid":  # -log sigmoid(beta h) = log(1 + exp(-beta h))
        f = lambda h: math.log(1.0 + math.exp(-beta * h))
    elif kind == "ipo":  # (h - 1/(2 beta))^2 ; beta 0.5: (-1.8)^2 = 3.24, (0.2)^2 = 0.04 -> mean 1.64
        f = lambda h: (h - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge relu(1 - beta h): 1.4, 0.4 -> mean 0.9
        f = lambda h: max(0.0, 1.0 - beta * h)
    return (f(m10) + f(m3)) / 2.0


def test_dpo_hand_per_sequence_sums():
    logp, ref, mask, _, _ = _pref_batch("abcd")
    h = ((logp - ref) * mask).sum(-1)
    torch.testing.assert_close(h, _t([H[k] for k in "abcd"]))
    assert _hand_pref("ipo", 0.5) == pytest.approx(1.64)
    assert _hand_pref("hinge", 0.5) == pytest.approx(0.9)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("order", ["abcd", "badc", "dbca"])
def test_dpo_family_hand_values_and_order_independence(kind, order):
    logp, ref, mask, gids, rewards = _pref_batch(order)
    cfg = AlgorithmConfig(objective="dpo", beta=0.5, pref_loss=kind)
    loss, m, _ = _grad(dpo, logp, None, ref, _t([0.0] * 4), mask, cfg, StepNorm.of(mask),
                       group_ids=gids, rewards=rewards)
    assert loss.item() == pytest.approx(_hand_pref(kind, 0.5), rel=1e-12)
    # accuracy: g10's margin is negative, g3's positive -> 0.5;  pref_margin: beta * mean margin = 0.5 * 0.2
    assert m["pref_accuracy"].item() == pytest.approx(0.5)
    assert m["pref_margin"].item() == pytest.approx(0.1)


def test_dpo_sigmoid_gradient_hand():
    # d/d logp_{a,t} of mean_g(-log sigmoid(beta h_g)) = -beta sigmoid(-beta h_g10) / 2 for a's tokens, + for b's
    logp, ref, mask, gids, rewards = _pref_batch("abcd")
    cfg = AlgorithmConfig(objective="dpo", beta=0.5)
    _, _, g = _grad(dpo, logp, None, ref, _t([0.0] * 4), mask, cfg, StepNorm.of(mask), group_ids=gids, rewards=rewards)
    s10 = 0.5 * _sigmoid(-0.5 * -0.8) / 2
    s3 = 0.5 * _sigmoid(-0.5 * 1.2) / 2
    expected = _t([[-s10] * 3, [s10, s10, 0.0], [-s3] * 3, [s3, 0.0, 0.0]])
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14)


def test_dpo_filler_group_contributes_nothing():
    # a third group, fully masked (dynamic-sampling filler), with a (1, 0) reward pair: no loss, no gradient
    logp, ref, mask, gids, rewards = _pref_batch("abcd")
    logp = torch.cat([logp, _t([[-3.0, -1.0, -2.0], [-0.1, -0.2, -0.3]])])
    ref = torch.cat([ref, _t([[-0.1, -0.2, -0.1], [-4.0, -4.0, -4.0]])])
    mask = torch.cat([mask, torch.zeros(2, 3, dtype=F64)])
    gids = torch.cat([gids, torch.tensor([77, 77])])
    rewards = torch.cat([rewards, _t([1.0, 0.0])])
    norm = StepNorm.of(mask)
    assert norm.num_seqs == 4.0
    cfg = AlgorithmConfig(objective="dpo", beta=0.5)
    loss, m, g = _grad(dpo, logp, None, ref, _t([0.0] * 6), mask, cfg, norm, group_ids=gids, rewards=rewards)
    assert loss.item() == pytest.approx(_hand_pref("sigmoid", 0.5), rel=1e-12)
    assert m["pref_accuracy"].item() == pytest.approx(0.5)
    assert torch.equal(g[4:], torch.zeros(2, 3, dtype=F64))


def test_dpo_online_group_all_pairs():
    # a group of 3 with rewards 2, 1, 0 (h = 0.3, -0.2, 0.1): pairs (0>1), (0>2), (1>2), mean over them
    #   margins 0.5, 0.2, -0.3; beta 1: mean of log(1 + exp(-m))
    logp = _t([[0.3], [-0.2], [0.1]])
    ref = torch.zeros(3, 1, dtype=F64)
    mask = torch.ones(3, 1, dtype=F64)
    cfg = AlgorithmConfig(objective="dpo", beta=1.0)
    loss, m, _ = _grad(dpo, logp, None, ref, _t([0.0] * 3), mask, cfg, StepNorm.of(mask),
                       group_ids=torch.tensor([0, 0, 0]), rewards=_t([2.0, 1.0, 0.0]))
    hand = sum(math.log(1 + math.exp(-x)) for x in (0.5, 0.2, -0.3)) / 3
    assert loss.item() == pytest.approx(hand, rel=1e-12)
    assert m["pref_accuracy"].item() == pytest.approx(2 / 3)


# =========================================================================================== MODPO
def test_modpo_hand_value():
    # w = 0.3, beta = 0.5, margins m: a 0.4, b -0.2, c 1.0, d 0.5
    # u = (beta h - (1 - w) m) / w:
    #   u_a = (-0.05 - 0.28) / 0.3 = -1.1         u_b = (0.35 + 0.14) / 0.3 = 1.6333333
    #   u_c = (0.35 - 0.70) / 0.3 = -1.1666667    u_d = (-0.25 - 0.35) / 0.3 = -2.0
    # deltas: g10 -2.7333333, g3 0.8333333;  loss = mean of -log sigmoid(delta)
    logp, ref, mask, gids, rewards = _pref_batch("abcd")
    margins = {"a": 0.4, "b": -0.2, "c": 1.0, "d": 0.5}
    w, beta = 0.3, 0.5
    u = {k: (beta * H[k] - (1 - w) * margins[k]) / w for k in "abcd"}
    assert u["a"] == pytest.approx(-1.1) and u["d"] == pytest.approx(-2.0)
    hand = (-math.log(_sigmoid(u["a"] - u["b"])) - math.log(_sigmoid(u["c"] - u["d"]))) / 2
    cfg = AlgorithmConfig(objective="modpo", beta=beta, modpo_weight=w)
    for order in ("abcd", "dcba"):
        logp, ref, mask, gids, rewards = _pref_batch(order)
        marg = _t([margins[k] for k in order])
        loss, _, _ = _grad(modpo, logp, None, ref, _t([0.0] * 4), mask, cfg, StepNorm.of(mask),
                           group_ids=gids, rewards=rewards, margin=marg)
        assert loss.item() == pytest.approx(hand, rel=1e-12)
    # hinge: relu(1 - delta): g10 1 + 2.7333 = 3.7333, g3 1 - 0.8333 = 0.1667 -> mean 1.95
    cfg_h = AlgorithmConfig(objective="modpo", beta=beta, modpo_weight=w, pref_loss="hinge")
    loss, _, _ = _grad(modpo, logp, None, ref, _t([0.0] * 4), mask, cfg_h, StepNorm.of(mask),
                       group_ids=gids, rewards=rewards, margin=marg)
    assert loss.item() == pytest.approx(1.95, rel=1e-12)


def test_modpo_equals_dpo_with_zero_margins_and_full_weight():
    logp, ref, mask, gids, rewards = _pref_batch("abcd")
    cfg = AlgorithmConfig(objective="modpo", beta=0.5, modpo_weight=1.0)
    loss, _, g = _grad(modpo, logp, None, ref, _t([0.0] * 4), mask, cfg, StepNorm.of(mask),
                       group_ids=gids, rewards=rewards, margin=_t([0.0] * 4))
    assert loss.item() == pytest.approx(_hand_pref("sigmoid", 0.5), rel=1e-12)
    s10 = 0.5 * _sigmoid(0.4) / 2
    assert g[0, 0].item() == pytest.approx(-s10, rel=1e-12)


def test_modpo_missing_margin_raises():
    logp, ref, mask, gids, rewards = _pref_batch("abcd")
    with pytest.raises(ValueError, match="margin"):
        modpo(logp, None, ref, _t([0.0] * 4), mask, AlgorithmConfig(beta=0.5), StepNorm.of(mask),
              group_ids=gids, rewards=rewards)


# ============================================================================================ CoPG
# group of 3, beta 0.1, rewards 1, 0, 0.5
#   s0: logp - ref = [0.5, 0.5]          -> h 1.0   R_beta = 1 - 0.1       = 0.90
#   s1: logp - ref = [-0.5, (4 masked)]  -> h -0.5  R_beta = 0 + 0.05      = 0.05
#   s2: logp - ref = [0.0, 0.2]          -> h 0.2   R_beta = 0.5 - 0.02    = 0.48
# pairs: (0.85)^2 + (0.42)^2 + (-0.43)^2 = 0.7225 + 0.1764 + 0.1849 = 1.0838;  / (k - 1 = 2) = 0.5419
COPG_LOGP = [[-1.0, -2.0], [-1.0, -3.0], [-2.0, -1.0]]
COPG_REF = [[-1.5, -2.5], [-0.5, -7.0], [-2.0, -1.2]]
COPG_MASK = [[1, 1], [1, 0], [1, 1]]


def _copg_ref(rewards, h, beta):
    """1/(k-1) sum_{i>j} (R_beta_i - R_beta_j)^2 with python floats."""
    rb = [r - beta * x for r, x in zip(rewards, h)]
    k = len(rb)
    return sum((rb[i] - rb[j]) ** 2 for i in range(k) for j in range(i)) / (k - 1)


def test_copg_hand_group_of_three():
    cfg = AlgorithmConfig(objective="copg", beta=0.1)
    mask = _t(COPG_MASK)
    loss, _, g = _grad(copg, _t(COPG_LOGP), None, _t(COPG_REF), _t([0.0] * 3), mask, cfg, StepNorm.of(mask),
                       group_ids=torch.tensor([4, 4, 4]), rewards=_t([1.0, 0.0, 0.5]))
    assert loss.item() == pytest.approx(0.5419, rel=1e-12)
    assert _copg_ref([1.0, 0.0, 0.5], [1.0, -0.5, 0.2], 0.1) == pytest.approx(0.5419)
    # d loss / d logp_{i,t} = -2 beta sum_j (R_i - R_j) / (k - 1):
    #   s0: -0.2 * (0.85 + 0.42) / 2 = -0.127   (highest reward: raising its logp LOWERS the loss)
    #   s1: -0.2 * (-0.85 - 0.43) / 2 = 0.128
    #   s2: -0.2 * (-0.42 + 0.43) / 2 = -0.001
    expected = _t([[-0.127, -0.127], [0.128, 0.0], [-0.001, -0.001]])
    torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-12)
    assert g[0, 0] < 0


def test_copg_two_groups_mean_over_groups():
    # second group (id 1) of 3: rewards 0, 1, 1; h = sums of [0.3], [-0.4], [0.1] (T=2, second token masked)
    logp = _t(COPG_LOGP + [[0.3, 9.0], [-0.4, 9.0], [0.1, 9.0]])
    ref = _t(COPG_REF + [[0.0, 0.0]] * 3)
    mask = _t(COPG_MASK + [[1, 0]] * 3)
    rewards = [1.0, 0.0, 0.5, 0.0, 1.0, 1.0]
    cfg = AlgorithmConfig(objective="copg", beta=0.1)
    loss, m, _ = _grad(copg, logp, None, ref, _t([0.0] * 6), mask, cfg, StepNorm.of(mask),
                       group_ids=torch.tensor([4, 4, 4, 1, 1, 1]), rewards=_t(rewards))
    g2 = _copg_ref([0.0, 1.0, 1.0], [0.3, -0.4, 0.1], 0.1)
    # R_beta: -0.03, 1.04, 0.99 -> (1.07^2 + 1.02^2 + 0.05^2) / 2 = (1.1449 + 1.0404 + 0.0025) / 2 = 1.0939
    assert g2 == pytest.approx(1.0939)
    assert loss.item() == pytest.approx((0.5419 + 1.0939) / 2, rel=1e-12)
    assert m["copg_group_size"].item() == pytest.approx(3.0)


# ============================================================================================ A-LoL
# B = 2, T = 3, mask [[1,1,1],[1,1,0]], A = [2.0, 0.5], eps 0.9 (ratios in [0.1, 1.9]), seq_mean_token_sum
#   s0: logp [-0.2, -1.3, -0.2], ref [-1.0, -1.2, -0.5]: log-ratios [0.8, -0.1, 0.3], sum 1.0, NLL 1.7
#       seq ratio e^1 = 2.718 -> 1.9;  token ratios e^0.8 = 2.2255 -> 1.9, e^-0.1 = 0.9048374, e^0.3 = 1.3498588
#   s1: logp [-4.0, -0.4, -9.0], ref [-1.5, -0.4, -1.0]: log-ratios [-2.5, 0.0, (-8 masked)], sum -2.5, NLL 4.4
#       seq ratio e^-2.5 = 0.0821 -> 0.1;  token ratios e^-2.5 -> 0.1, 1.0
ALOL_LOGP = [[-0.2, -1.3, -0.2], [-4.0, -0.4, -9.0]]
ALOL_REF = [[-1.0, -1.2, -0.5], [-1.5, -0.4, -1.0]]
ALOL_MASK = [[1, 1, 1], [1, 1, 0]]
ALOL_ADV = [2.0, 0.5]


def _alol_hand(variant, beta=0.3):
    e = math.exp
    w_tok = [[1.9, e(-0.1), e(0.3)], [0.1, 1.0, 0.0]]
    if variant == "seq":
        # (2 * 1.9 * 1.7 + 0.5 * 0.1 * 4.4) / 2 = (6.46 + 0.22) / 2 = 3.34
        loss = 3.34
        w = [[1.9] * 3, [0.1, 0.1, 0.0]]
    elif variant == "token":
        # (2 * (1.9 * 0.2 + 0.9048374 * 1.3 + 1.3498588 * 0.2) + 0.5 * (0.1 * 4.0 + 1.0 * 0.4)) / 2
        loss = (2 * (1.9 * 0.2 + e(-0.1) * 1.3 + e(0.3) * 0.2) + 0.5 * (0.1 * 4.0 + 1.0 * 0.4)) / 2
        w = w_tok
    elif variant == "kl":
        # (2 * 1.7 + 0.5 * 4.4 + 0.3 * (1.0 - 2.5)) / 2 = (5.6 - 0.45) / 2 = 2.575
        loss = 2.575
        w = [[1.0] * 3, [1.0, 1.0, 0.0]]
    else:  # ref_free: (2 * 1.7 + 0.5 * 4.4) / 2 = 2.8
        loss = 2.8
        w = [[1.0] * 3, [1.0, 1.0, 0.0]]
    # gradient per token: -A w / num_seqs (+ beta / num_seqs for kl), 0 on the padded token
    grad = [[-ALOL_ADV[i] * w[i][t] / 2 + (beta / 2 if variant == "kl" else 0.0) for t in range(3)] for i in range(2)]
    grad[1][2] = 0.0
    return loss, grad


@pytest.mark.parametrize("variant", ["seq", "token", "kl", "ref_free"])
def test_alol_variants_hand(variant):
    cfg = AlgorithmConfig(objective="alol", alol_variant=variant, alol_clip=0.9, beta=0.3,
                          loss_agg="seq_mean_token_sum")
    mask = _t(ALOL_MASK)
    ref = None if variant == "ref_free" else _t(ALOL_REF)
    loss, m, g = _grad(alol, _t(ALOL_LOGP), None, ref, _t(ALOL_ADV), mask, cfg, StepNorm.of(mask))
    hand_loss, hand_grad = _alol_hand(variant)
    assert loss.item() == pytest.approx(hand_loss, rel=1e-12)
    torch.testing.assert_close(g, _t(hand_grad), rtol=1e-12, atol=1e-14)
    assert m["alol_positive_frac"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("variant", ["seq", "token"])
def test_alol_unclipped_weight_carries_no_gradient(variant):
    # one sequence, log-ratios [0.2, 0.1] (inside the clip range), NLL = 0.5 + 1.0 = 1.5, A = 1.5
    #   seq:   w = e^0.3 on both tokens;  loss = 1.5 * e^0.3 * 1.5;  grad = -1.5 * e^0.3
    #   token: w = [e^0.2, e^0.1];         loss = 1.5 * (e^0.2 * 0.5 + e^0.1 * 1.0);  grad = -1.5 * w_t
    # (a weight that carried gradient would add -A * NLL-weighted terms d w / d logp to these)
    e = math.exp
    w = [e(0.3), e(0.3)] if variant == "seq" else [e(0.2), e(0.1)]
    mask = _t([[1, 1]])
    cfg = AlgorithmConfig(objective="alol", alol_variant=variant, loss_agg="seq_mean_token_sum")
    loss, m, g = _grad(alol, _t([[-0.5, -1.0]]), None, _t([[-0.7, -1.1]]), _t([1.5]), mask, cfg, StepNorm.of(mask))
    assert loss.item() == pytest.approx(1.5 * (w[0] * 0.5 + w[1] * 1.0), rel=1e-12)
    torch.testing.assert_close(g, _t([[-1.5 * w[0], -1.5 * w[1]]]), rtol=1e-12, atol=1e-14)
    assert m["alol_weight"].item() == pytest.approx((w[0] + w[1]) / 2)


def test_alol_needs_reference_except_ref_free():
    mask = _t(ALOL_MASK)
    with pytest.raises(ValueError, match="reference"):
        alol(_t(ALOL_LOGP), None, None, _t(ALOL_ADV), mask, AlgorithmConfig(alol_variant="seq"), StepNorm.of(mask))


# ======================================================================================= SFT / DFT
def test_dft_gradient_is_advantage_times_prob():
    # token_mean over 3 tokens: l = -A sg(p) log p;  d/d logp = -A p / 3
    logp = _t([[-0.5, -1.5], [-0.2, -7.0]])
    mask = _t([[1, 1], [1, 0]])
    adv = _t([1.0, -2.0])
    cfg = AlgorithmConfig(objective="dft", loss_agg="token_mean")
    loss, m, g = _grad(dft, logp, None, None, adv, mask, cfg, StepNorm.of(mask))
    e = math.exp
    hand = (-1 * e(-0.5) * -0.5 - 1 * e(-1.5) * -1.5 + 2 * e(-0.2) * -0.2) / 3
    assert loss.item() == pytest.approx(hand, rel=1e-12)
    expected = _t([[-e(-0.5) / 3, -e(-1.5) / 3], [2 * e(-0.2) / 3, 0.0]])
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14)
    assert m["token_prob"].item() == pytest.approx((e(-0.5) + e(-1.5) + e(-0.2)) / 3)


def test_sft_zero_advantage_sequence_is_ignored():
    # A = [1, 0]: loss = -(logp_00 + logp_01) / 3 tokens = 2.0 / 3; second sequence: no value, no gradient
    mask = _t([[1, 1], [1, 0]])
    cfg = AlgorithmConfig(objective="sft", loss_agg="token_mean")
    loss, m, g = _grad(sft, _t([[-0.5, -1.5], [-0.2, -7.0]]), None, None, _t([1.0, 0.0]), mask, cfg,
                       StepNorm.of(mask))
    assert loss.item() == pytest.approx(2.0 / 3, rel=1e-12)
    torch.testing.assert_close(g, _t([[-1 / 3, -1 / 3], [0.0, 0.0]]))
    loss2, _, _ = _grad(sft, _t([[-0.5, -1.5], [-3.0, -0.1]]), None, None, _t([1.0, 0.0]), mask, cfg,
                        StepNorm.of(mask))
    assert loss2.item() == loss.item()
    assert m["kept_frac"].item() == pytest.approx(0.5)


def test_asft_is_dft_plus_beta_token_mean_kl():
    # vocab_kl [[0.2, 0.4], [0.6, 5.0 (masked)]]: token mean (0.2 + 0.4 + 0.6) / 3 = 0.4; beta 0.1 -> +0.04
    logp = _t([[-0.5, -1.5], [-0.2, -7.0]])
    mask = _t([[1, 1], [1, 0]])
    adv = _t([1.0, -2.0])
    e = math.exp
    dft_hand = (-1 * e(-0.5) * -0.5 - 1 * e(-1.5) * -1.5 + 2 * e(-0.2) * -0.2) / 3
    kl = _leaf([[0.2, 0.4], [0.6, 5.0]])
    cfg = AlgorithmConfig(objective="asft", beta=0.1, loss_agg="token_mean")
    loss, m = asft(logp, None, None, adv, mask, cfg, StepNorm.of(mask), vocab_kl=kl)
    assert loss.item() == pytest.approx(dft_hand + 0.1 * 0.4, rel=1e-12)
    assert m["vocab_kl"].item() == pytest.approx(0.4)
    (gk,) = torch.autograd.grad(loss, kl)
    torch.testing.assert_close(gk, _t([[0.1 / 3, 0.1 / 3], [0.1 / 3, 0.0]]))
    with pytest.raises(ValueError, match="vocab_kl"):
        asft(logp, None, None, adv, mask, cfg, StepNorm.of(mask))
    assert asft.forward_options(cfg) == {"vocab_kl": True}


# ============================================================================================= IFT
def test_ift_weights_hand():
    # gamma 0.5, nll [1, 2, 4], L = 3:
    #   w0 = (1 + 0.5*2 + 0.25*4) / 3 = 1;  w1 = (2 + 0.5*4) / 3 = 4/3;  w2 = 4/3;  sum 11/3
    #   rescaled to sum L = 3: w * 3 / (11/3) = w * 9/11 -> [9/11, 12/11, 12/11]
    w = ift_weights(_t([[1.0, 2.0, 4.0]]), _t([[1, 1, 1]]), 0.5)
    torch.testing.assert_close(w, _t([[9 / 11, 12 / 11, 12 / 11]]), rtol=1e-12, atol=1e-14)
    # a padded 4th token (its nll 100 must not leak into the others) gets weight 0
    w = ift_weights(_t([[1.0, 2.0, 4.0, 100.0]]), _t([[1, 1, 1, 0]]), 0.5)
    torch.testing.assert_close(w, _t([[9 / 11, 12 / 11, 12 / 11, 0.0]]), rtol=1e-12, atol=1e-14)


def _ift_ref(logp, mask, adv, gamma):
    """Loop reference (differentiable through torch scalars): mean over sequences of
    A (1/L) sum_t w_t l_t, w_t = sum_{k>=t} gamma^(k-t) l_k / L rescaled to sum L."""
    total = 0.0
    n = 0
    for i in range(logp.shape[0]):
        toks = [t for t in range(logp.shape[1]) if mask[i, t] > 0]
        if not toks:
            continue
        n += 1
        L = len(toks)
        nll = [-logp[i, t] for t in toks]
        w = [sum(gamma ** (k - t) * nll[k] for k in range(t, L)) / L for t in range(L)]
        s = sum(w)
        w = [x * L / s for x in w]
        total = total + adv[i] * sum(w[t] * nll[t] for t in range(L)) / L
    return total / n


def test_ift_loss_value_and_gradient_through_weights():
    # seq 0: nll [1, 2, 4] -> (9/11 * 1 + 12/11 * 2 + 12/11 * 4) / 3 = 81/33 = 27/11
    # seq 1: nll [0.5, 3.0], padded 3rd; A = 2
    logp = _t([[-1.0, -2.0, -4.0], [-0.5, -3.0, -50.0]])
    mask = _t([[1, 1, 1], [1, 1, 0]])
    adv = _t([1.0, 2.0])
    cfg = AlgorithmConfig(objective="ift", ift_gamma=0.5)
    loss, _, g = _grad(ift, logp, None, None, adv, mask, cfg, StepNorm.of(mask))
    # seq 1: w = [(0.5 + 1.5)/2, 3/2] = [1, 1.5], sum 2.5 -> *2/2.5 -> [0.8, 1.2]; (0.8*0.5 + 1.2*3)/2 = 2.0; A 2 -> 4
    assert loss.item() == pytest.approx((27 / 11 + 4.0) / 2, rel=1e-12)
    lp = _leaf(logp)
    ref_loss = _ift_ref(lp, mask, adv, 0.5)
    (g_ref,) = torch.autograd.grad(ref_loss, lp)
    assert ref_loss.item() == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)
    # the weights are not detached: the gradient differs from that of the same weights held fixed
    w_fixed = _t([[9 / 11, 12 / 11, 12 / 11], [0.8, 1.2, 0.0]])
    g_fixed = -(adv.unsqueeze(-1) * w_fixed / mask.sum(-1, keepdim=True)) / 2
    assert not torch.allclose(g, g_fixed)
    assert ift.forward_options(cfg) == {"residual_lambda": 0.2}


# ============================================================================ micro-batch invariance
def _split_check(fn, logp, old, ref, adv, mask, cfg, batch, cut, norm_len=1.0):
    """Full batch vs two micro-batches [:cut], [cut:] with the full step's StepNorm: values and gradients."""
    norm = StepNorm(float(mask.sum()), float((mask.sum(-1) > 0).sum()), norm_len)

    def run(sl):
        def part(x):
            return None if x is None else x[sl]
        return _grad(fn, logp[sl], part(old), part(ref), adv[sl], mask[sl], cfg, norm,
                     **{k: v[sl] for k, v in batch.items()})

    full_loss, full_m, full_g = run(slice(None))
    l1, m1, g1 = run(slice(0, cut))
    l2, m2, g2 = run(slice(cut, None))
    torch.testing.assert_close(l1 + l2, full_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([g1, g2]), full_g, rtol=1e-10, atol=1e-12)
    for k in full_m:
        torch.testing.assert_close(m1[k] + m2[k], full_m[k], rtol=1e-10, atol=1e-12)
    assert full_loss.item() != 0.0


def _random_batch(B, T, seed):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen, dtype=F64) * 2 - 0.05
    logp = old + 0.3 * torch.randn(B, T, generator=gen, dtype=F64)
    ref = old + 0.2 * torch.randn(B, T, generator=gen, dtype=F64)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(F64)
    return logp, old, ref, mask, gen


@pytest.mark.parametrize("loss_agg", LOSS_AGG_MODES)
def test_microbatch_invariance_nft(loss_agg):
    logp, old, ref, mask, _ = _random_batch(12, 5, 0)
    gids = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    rewards = _t([1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 1, 0])
    cfg = AlgorithmConfig(objective="nft", loss_agg=loss_agg, nft_clamp=0.8)
    _split_check(nft, logp, old, None, _t([0.0] * 12), mask, cfg, {"group_ids": gids, "rewards": rewards},
                 cut=4, norm_len=7.0)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
def test_microbatch_invariance_dpo(kind):
    logp, _, ref, mask, _ = _random_batch(8, 4, 1)
    gids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    rewards = _t([1, 0, 0, 1, 1, 0, 0, 1])
    cfg = AlgorithmConfig(objective="dpo", beta=0.7, pref_loss=kind)
    _split_check(dpo, logp, None, ref, _t([0.0] * 8), mask, cfg, {"group_ids": gids, "rewards": rewards}, cut=2)
    _split_check(dpo, logp, None, ref, _t([0.0] * 8), mask, cfg, {"group_ids": gids, "rewards": rewards}, cut=6)


def test_microbatch_invariance_copg():
    logp, _, ref, mask, gen = _random_batch(9, 4, 2)
    gids = torch.tensor([0] * 3 + [1] * 3 + [2] * 3)
    rewards = torch.rand(9, generator=gen, dtype=F64)
    cfg = AlgorithmConfig(objective="copg", beta=0.2)
    _split_check(copg, logp, None, ref, _t([0.0] * 9), mask, cfg, {"group_ids": gids, "rewards": rewards}, cut=3)
    _split_check(copg, logp, None, ref, _t([0.0] * 9), mask, cfg, {"group_ids": gids, "rewards": rewards}, cut=6)


@pytest.mark.parametrize("variant", ["seq", "token", "kl", "ref_free"])
@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_sum"])
def test_microbatch_invariance_alol(variant, loss_agg):
    logp, _, ref, mask, gen = _random_batch(6, 4, 3)
    adv = torch.rand(6, generator=gen, dtype=F64)
    cfg = AlgorithmConfig(objective="alol", alol_variant=variant, beta=0.1, loss_agg=loss_agg)
    _split_check(alol, logp, None, ref, adv, mask, cfg, {}, cut=2)
