"""PPO-clip family objective (shared/objectives.py, METHODS.md A "Surrogate per step").

Hand-computed values (arithmetic in comments) and python-loop references.
"""

from __future__ import annotations

import math

import pytest
import torch

from shared.aggregation import StepNorm
from shared.objectives import OBJECTIVES, clipped_surrogate, ppo_clip, sequence_log_ratio

from shared.config import AlgorithmConfig


def make_cfg(**kw):
    return AlgorithmConfig(**kw)


F64 = torch.float64


def _t(x):
    return torch.tensor(x, dtype=F64)


# --------------------------------------------------------------------------------------------
# clipped_surrogate
# --------------------------------------------------------------------------------------------


def test_registry():
    assert OBJECTIVES["ppo_clip"] is ppo_clip


def test_clipped_surrogate_positive_advantage_clip_higher():
    # eps_low = 0.2, eps_high = 0.28: clip range [0.8, 1.28];  A = +2
    # l = -min(rho*A, clip(rho)*A) = max(-rho*A, -clip(rho)*A)
    #   rho 1.1 (inside): max(-2.2, -2.2)            = -2.2
    #   rho 0.5 (below):  max(-1.0, -2*0.8 = -1.6)   = -1.0   (pessimistic: unclipped)
    #   rho 1.5 (above):  max(-3.0, -2*1.28 = -2.56) = -2.56  (clipped at 1+eps_high)
    #   rho 1.25: inside [0.8, 1.28]                 = -2.5   (would be clipped at 1.2 with eps_high=0.2)
    ratio = _t([1.1, 0.5, 1.5, 1.25])
    out = clipped_surrogate(ratio, _t(2.0), eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(out, _t([-2.2, -1.0, -2.56, -2.5]))
    # symmetric eps 0.2: rho 1.25 and 1.5 clip at 1.2 -> -2.4
    out = clipped_surrogate(ratio, _t(2.0), eps_low=0.2, eps_high=0.2)
    torch.testing.assert_close(out, _t([-2.2, -1.0, -2.4, -2.4]))


def test_clipped_surrogate_negative_advantage_clip_higher():
    # A = -1, range [0.8, 1.28]:  l = max(rho, clip(rho))
    #   rho 1.1 (inside): max(1.1, 1.1)  = 1.1
    #   rho 0.5 (below):  max(0.5, 0.8)  = 0.8   (clipped at 1-eps_low)
    #   rho 1.5 (above):  max(1.5, 1.28) = 1.5   (unclipped, no cap without dual clip)
    #   rho 0.75 with eps_low 0.3 -> range [0.7, ..]: inside -> 0.75
    ratio = _t([1.1, 0.5, 1.5])
    torch.testing.assert_close(clipped_surrogate(ratio, _t(-1.0), 0.2, 0.28), _t([1.1, 0.8, 1.5]))
    torch.testing.assert_close(clipped_surrogate(_t([0.75]), _t(-1.0), 0.3, 0.28), _t([0.75]))
    torch.testing.assert_close(clipped_surrogate(_t([0.75]), _t(-1.0), 0.2, 0.28), _t([0.8]))


def test_clipped_surrogate_gradient_zero_in_clipped_region():
    # d l / d rho = -A where the unclipped term is active, 0 where the clipped term is
    ratio = _t([1.1, 0.5, 1.5, 1.1, 0.5, 1.5]).requires_grad_(True)
    adv = _t([2.0, 2.0, 2.0, -1.0, -1.0, -1.0])
    clipped_surrogate(ratio, adv, 0.2, 0.28).sum().backward()
    torch.testing.assert_close(ratio.grad, _t([-2.0, -2.0, 0.0, 1.0, 0.0, 1.0]))


def test_dual_clip_caps_negative_advantage_loss():
    # c = 3, A = -1 (range [0.8, 1.28]):
    #   rho 5.0: max(5, 1.28) = 5 -> min(5, -c*A = 3) = 3   (capped)
    #   rho 2.0: 2 < 3 -> 2
    #   rho 0.5: 0.8
    # A = -2, rho 2.0: max(4, 2.56) = 4 -> min(4, 6) = 4;  rho 4: 8 -> 6
    # A = +2 is never affected: rho 5 -> max(-10, -2.56) = -2.56
    ratio = _t([5.0, 2.0, 0.5, 2.0, 4.0, 5.0]).requires_grad_(True)
    adv = _t([-1.0, -1.0, -1.0, -2.0, -2.0, 2.0])
    out = clipped_surrogate(ratio, adv, 0.2, 0.28, dual_clip=3.0)
    torch.testing.assert_close(out, _t([3.0, 2.0, 0.8, 4.0, 6.0, -2.56]))
    out.sum().backward()
    # the cap is constant -> zero gradient there
    torch.testing.assert_close(ratio.grad, _t([0.0, 1.0, 0.0, 2.0, 0.0, 0.0]))
    # without dual clip the loss is unbounded
    torch.testing.assert_close(clipped_surrogate(ratio.detach(), adv, 0.2, 0.28), _t([5.0, 2.0, 0.8, 4.0, 8.0, -2.56]))


def test_clipped_surrogate_broadcasts_adv_over_steps():
    ratio = _t([[1.5, 0.5], [1.5, 0.5]])
    adv = _t([[1.0], [-1.0]])
    # row 0 (A=1): max(-1.5, -1.2) = -1.2 ; max(-0.5, -0.8) = -0.5
    # row 1 (A=-1): max(1.5, 1.2) = 1.5   ; max(0.5, 0.8) = 0.8
    torch.testing.assert_close(clipped_surrogate(ratio, adv, 0.2, 0.2), _t([[-1.2, -0.5], [1.5, 0.8]]))


# --------------------------------------------------------------------------------------------
# ppo_clip: on-policy gradient, GSPO, KL, metrics
# --------------------------------------------------------------------------------------------

MASK = _t([[1, 1, 0], [1, 1, 1]])
ADV = _t([2.0, -1.0])


def test_on_policy_ratio_one_gradient_token_mean():
    # old_logp = logp.detach() -> rho = 1 in value; d rho / d logp = 1, so
    #   d loss / d logp_{i,t} = -A_i * w_{i,t},  token_mean: w = mask / 5 (5 unmasked tokens)
    #   row 0: -2/5 = -0.4 on 2 tokens, 0 on the pad;  row 1: +1/5 = 0.2 on 3 tokens
    #   loss value = sum(-A_i * w) = (-2*2 + 1*3)/5 = -0.2
    logp = _t([[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.9]]).requires_grad_(True)
    cfg = make_cfg(eps_low=0.2, eps_high=0.28)
    loss, metrics = ppo_clip(logp, logp.detach(), None, ADV, MASK, cfg, StepNorm.of(MASK))
    assert loss.item() == pytest.approx(-0.2, abs=1e-7)
    loss.backward()
    torch.testing.assert_close(logp.grad, _t([[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]]), rtol=1e-6, atol=1e-7)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0, abs=1e-7)
    assert metrics["clip_frac_low"].item() == 0.0 and metrics["clip_frac_high"].item() == 0.0
    assert metrics["kl_old"].item() == 0.0
    assert "kl_ref" not in metrics


def test_on_policy_ratio_one_gradient_seq_mean_token_mean():
    # seq_mean_token_mean: w_{i,t} = mask / (num_seqs=2 * |o_i|)
    #   row 0: -A/(2*2) = -2/4 = -0.5 ;  row 1: +1/(2*3) = 1/6
    #   loss = mean(-2, +1) = -0.5
    logp = _t([[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.9]]).requires_grad_(True)
    cfg = make_cfg(loss_agg="seq_mean_token_mean")
    loss, _ = ppo_clip(logp, logp.detach(), None, ADV, MASK, cfg, StepNorm.of(MASK))
    assert loss.item() == pytest.approx(-0.5, abs=1e-7)
    loss.backward()
    torch.testing.assert_close(logp.grad, _t([[-0.5, -0.5, 0.0], [1 / 6, 1 / 6, 1 / 6]]), rtol=1e-6, atol=1e-7)


def test_ppo_clip_hand_value_off_policy():
    # token level, eps 0.2/0.28, token_mean over the 5 unmasked tokens
    # row 0 (A=+2): log rho = (0, ln 1.5, <pad>) -> rho (1, 1.5): l = (-2, -2*1.28 = -2.56)
    # row 1 (A=-1): log rho = (ln 0.5, ln 1.1, ln 1.5) -> l = (0.8, 1.1, 1.5)
    # loss = (-2 - 2.56 + 0.8 + 1.1 + 1.5) / 5 = -1.16 / 5 = -0.232
    old = _t([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    logp = old + _t([[0.0, math.log(1.5), 9.0], [math.log(0.5), math.log(1.1), math.log(1.5)]])
    cfg = make_cfg(eps_low=0.2, eps_high=0.28)
    loss, m = ppo_clip(logp, old, None, ADV, MASK, cfg, StepNorm.of(MASK))
    assert loss.item() == pytest.approx(-0.232, abs=1e-7)
    # clip_frac_high: rho > 1.28 with A > 0 -> token (0,1): 1/5
    # clip_frac_low:  rho < 0.8  with A < 0 -> token (1,0): 1/5
    assert m["clip_frac_high"].item() == pytest.approx(0.2, abs=1e-7)
    assert m["clip_frac_low"].item() == pytest.approx(0.2, abs=1e-7)
    # ratio_mean = (1 + 1.5 + 0.5 + 1.1 + 1.5)/5 = 5.6/5 = 1.12 (pad token excluded)
    assert m["ratio_mean"].item() == pytest.approx(1.12, abs=1e-7)


def test_clip_fraction_metrics_hand_case():
    # eps 0.2 / 0.2; mask has 5 tokens (pad at (1,2))
    # row 0, A=+1: rho (1.5, 1.0, 0.5):  1.5 > 1.2 & A>0 -> high;  0.5 < 0.8 but A>0 -> not clipped
    # row 1, A=-1: rho (0.5, 1.5, 0.7):  0.5 < 0.8 & A<0 -> low;  1.5 > 1.2 but A<0 -> not clipped;
    #              0.7 would be low but is masked
    # clip_frac_high = 1/5, clip_frac_low = 1/5
    # ratio_mean = (1.5 + 1 + 0.5 + 0.5 + 1.5)/5 = 1.0
    # kl_old = mean(0.5 * log(rho)^2) = 0.5 * (2 ln(1.5)^2 + 2 ln(0.5)^2) / 5
    mask = _t([[1, 1, 1], [1, 1, 0]])
    rho = _t([[1.5, 1.0, 0.5], [0.5, 1.5, 0.7]])
    old = torch.zeros(2, 3, dtype=F64) - 2.0
    logp = old + rho.log()
    cfg = make_cfg(eps_low=0.2, eps_high=0.2)
    _, m = ppo_clip(logp, old, None, _t([1.0, -1.0]), mask, cfg, StepNorm.of(mask))
    assert m["clip_frac_high"].item() == pytest.approx(0.2, abs=1e-7)
    assert m["clip_frac_low"].item() == pytest.approx(0.2, abs=1e-7)
    assert m["ratio_mean"].item() == pytest.approx(1.0, abs=1e-7)
    kl_old = 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 5
    assert m["kl_old"].item() == pytest.approx(kl_old, rel=1e-6)


def test_clip_fraction_is_share_of_step_norm():
    # metrics are shares of the step-level token mean: with a step of 10 tokens, this micro-batch of
    # 5 tokens with one high-clipped token reports 1/10
    mask = _t([[1, 1, 1], [1, 1, 0]])
    old = torch.zeros(2, 3, dtype=F64)
    logp = old + _t([[math.log(1.5), 0, 0], [0, 0, 0]])
    cfg = make_cfg()
    _, m = ppo_clip(logp, old, None, _t([1.0, 1.0]), mask, cfg, StepNorm(num_tokens=10.0, num_seqs=4.0))
    assert m["clip_frac_high"].item() == pytest.approx(0.1, abs=1e-7)


def test_gspo_hand_value():
    # ratio_level = sequence: s_i = exp(mean over unmasked t of log rho_{i,t})
    # row 0 (A=+1): log rho (0.1, 0.3, pad 5.0) -> mean 0.2 -> s = e^0.2 = 1.221403 (inside [0.8, 1.28])
    #                l = -1.221403 on both unmasked tokens
    # row 1 (A=-1): log rho (-0.5, -0.3, -0.1) -> mean -0.3 -> s = e^-0.3 = 0.740818 < 0.8 -> l = 0.8
    # token_mean over 5 tokens: (2 * -e^0.2 + 3 * 0.8) / 5
    old = torch.full((2, 3), -1.0, dtype=F64)
    logp = old + _t([[0.1, 0.3, 5.0], [-0.5, -0.3, -0.1]])
    cfg = make_cfg(ratio_level="sequence", eps_low=0.2, eps_high=0.28)
    loss, m = ppo_clip(logp, old, None, _t([1.0, -1.0]), MASK, cfg, StepNorm.of(MASK))
    assert loss.item() == pytest.approx((-2 * math.exp(0.2) + 3 * 0.8) / 5, abs=1e-7)
    # row 1 is clipped low at sequence level: all 3 of its tokens count -> 3/5
    assert m["clip_frac_low"].item() == pytest.approx(0.6, abs=1e-7)
    assert m["ratio_mean"].item() == pytest.approx((2 * math.exp(0.2) + 3 * math.exp(-0.3)) / 5, abs=1e-7)


def test_sequence_log_ratio_ignores_masked_positions():
    lr = _t([[0.1, 0.3, 5.0], [-0.5, -0.3, -0.1], [7.0, 7.0, 7.0]])
    mask = _t([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    out = sequence_log_ratio(lr, mask)
    # row 0: (0.1+0.3)/2 = 0.2; row 1: -0.9/3 = -0.3; row 2 empty: 0/max(0,1) = 0
    torch.testing.assert_close(out, _t([[0.2] * 3, [-0.3] * 3, [0.0] * 3]))


def _gspo_loop_loss(logp, old, adv, mask, eps_low, eps_high):
    """Loop reference for GSPO with token_mean aggregation (differentiable, python loops)."""
    B, T = mask.shape
    total = 0.0
    n_tok = 0
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t] > 0]
        if not toks:
            continue
        s = torch.exp(sum(logp[i, t] - old[i, t] for t in toks) / len(toks))
        a = adv[i]
        l_i = torch.maximum(-a * s, -a * torch.clamp(s, 1 - eps_low, 1 + eps_high))
        total = total + l_i * len(toks)
        n_tok += len(toks)
    return total / n_tok


def test_gspo_against_loop_reference_value_and_grad():
    gen = torch.Generator().manual_seed(3)
    B, T = 6, 5
    lengths = [5, 2, 4, 1, 3, 5]
    mask = torch.zeros(B, T, dtype=F64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    base = -torch.rand(B, T, generator=gen, dtype=F64) * 2
    old = base + 0.3 * torch.randn(B, T, generator=gen, dtype=F64)
    adv = torch.randn(B, generator=gen, dtype=F64)
    cfg = make_cfg(ratio_level="sequence", eps_low=0.2, eps_high=0.28)

    logp = base.clone().requires_grad_(True)
    loss, _ = ppo_clip(logp, old, None, adv, mask, cfg, StepNorm.of(mask))
    loss.backward()

    logp_ref = base.clone().requires_grad_(True)
    ref = _gspo_loop_loss(logp_ref, old, adv, mask, 0.2, 0.28)
    ref.backward()

    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logp.grad, logp_ref.grad, rtol=1e-6, atol=1e-7)
    # the token-level ratio would give a different value on this input
    loss_tok, _ = ppo_clip(base, old, None, adv, mask, make_cfg(eps_low=0.2, eps_high=0.28), StepNorm.of(mask))
    assert abs(loss_tok.item() - loss.item()) > 1e-4


# KL setup: logp = -1 everywhere; ref = -2 on row 0, 0 on row 1
#   row 0: log r = -2 - (-1) = -1 -> k3 = e^-1           ~ 0.367879
#   row 1: log r =  0 - (-1) = +1 -> k3 = e - 2          ~ 0.718282
# ratio 1 (old = logp), ADV = (2, -1), MASK rows of 2 and 3 tokens.
K3_0 = math.exp(-1.0)
K3_1 = math.e - 2.0
LOGP = torch.full((2, 3), -1.0, dtype=F64)
REF = _t([[-2.0, -2.0, -2.0], [0.0, 0.0, 0.0]])


def test_kl_in_loss_token_mean_hand():
    # surrogate token_mean = -0.2 (see test_on_policy_ratio_one_gradient_token_mean)
    # KL token_mean = (2*e^-1 + 3*(e-2)) / 5
    # loss = -0.2 + 0.1 * KL
    cfg = make_cfg(beta=0.1, kl_placement="loss")
    loss, m = ppo_clip(LOGP, LOGP, REF, ADV, MASK, cfg, StepNorm.of(MASK))
    kl_tm = (2 * K3_0 + 3 * K3_1) / 5
    assert loss.item() == pytest.approx(-0.2 + 0.1 * kl_tm, abs=1e-7)
    assert m["kl_ref"].item() == pytest.approx(kl_tm, abs=1e-7)


def test_kl_in_loss_aggregated_like_surrogate():
    # seq_mean_token_mean: surrogate = mean(-2, 1) = -0.5 ; KL = mean(e^-1, e-2)
    # loss = -0.5 + 0.1 * (e^-1 + e - 2)/2, while the kl_ref METRIC stays a token mean
    cfg = make_cfg(beta=0.1, kl_placement="loss", loss_agg="seq_mean_token_mean")
    loss, m = ppo_clip(LOGP, LOGP, REF, ADV, MASK, cfg, StepNorm.of(MASK))
    assert loss.item() == pytest.approx(-0.5 + 0.1 * (K3_0 + K3_1) / 2, abs=1e-7)
    assert m["kl_ref"].item() == pytest.approx((2 * K3_0 + 3 * K3_1) / 5, abs=1e-7)
    # seq_mean_token_sum: surrogate = mean(-2*2, 1*3) = -0.5; KL = mean(2 e^-1, 3 (e-2))
    cfg = make_cfg(beta=0.1, loss_agg="seq_mean_token_sum")
    loss, _ = ppo_clip(LOGP, LOGP, REF, ADV, MASK, cfg, StepNorm.of(MASK))
    assert loss.item() == pytest.approx(-0.5 + 0.1 * (2 * K3_0 + 3 * K3_1) / 2, abs=1e-7)


def test_kl_in_loss_gradient():
    # d/d logp of beta*k3 = beta * (1 - e^{log r});  token_mean weight 1/5
    #   row 0: surrogate -2/5, KL 0.1*(1 - e^-1)/5 ; row 1: surrogate +1/5, KL 0.1*(1 - e)/5
    logp = LOGP.clone().requires_grad_(True)
    cfg = make_cfg(beta=0.1)
    loss, _ = ppo_clip(logp, logp.detach(), REF, ADV, MASK, cfg, StepNorm.of(MASK))
    loss.backward()
    g0 = (-2 + 0.1 * (1 - math.exp(-1))) / 5
    g1 = (1 + 0.1 * (1 - math.e)) / 5
    torch.testing.assert_close(logp.grad, _t([[g0, g0, 0.0], [g1, g1, g1]]), rtol=1e-6, atol=1e-7)


def test_kl_estimator_choice_used_in_loss():
    # k1 on row 0 = logp - ref = 1, row 1 = -1: token mean = (2 - 3)/5 = -0.2
    cfg = make_cfg(beta=0.5, kl_estimator="k1")
    loss, m = ppo_clip(LOGP, LOGP, REF, ADV, MASK, cfg, StepNorm.of(MASK))
    assert m["kl_ref"].item() == pytest.approx(-0.2, abs=1e-7)
    assert loss.item() == pytest.approx(-0.2 + 0.5 * -0.2, abs=1e-7)


def test_kl_placement_reward_not_in_loss():
    base, _ = ppo_clip(LOGP, LOGP, None, ADV, MASK, make_cfg(), StepNorm.of(MASK))
    cfg = make_cfg(beta=0.1, kl_placement="reward")
    loss, m = ppo_clip(LOGP, LOGP, REF, ADV, MASK, cfg, StepNorm.of(MASK))
    assert loss.item() == pytest.approx(base.item(), abs=1e-12)
    assert loss.item() == pytest.approx(-0.2, abs=1e-7)
    # still reported
    assert m["kl_ref"].item() == pytest.approx((2 * K3_0 + 3 * K3_1) / 5, abs=1e-7)


def test_beta_zero_or_no_reference_disables_kl():
    loss0, m0 = ppo_clip(LOGP, LOGP, REF, ADV, MASK, make_cfg(beta=0.0), StepNorm.of(MASK))
    loss1, m1 = ppo_clip(LOGP, LOGP, None, ADV, MASK, make_cfg(beta=0.1), StepNorm.of(MASK))
    for loss, m in ((loss0, m0), (loss1, m1)):
        assert loss.item() == pytest.approx(-0.2, abs=1e-7)
        assert "kl_ref" not in m


def test_huge_log_ratio_stays_finite():
    # log-ratio clamped at MAX_LOG_RATIO = 20 before exp
    old = torch.zeros(1, 2, dtype=F64)
    logp = _t([[500.0, -500.0]]).requires_grad_(True)
    mask = torch.ones(1, 2, dtype=F64)
    loss, m = ppo_clip(logp, old, None, _t([-1.0]), mask, make_cfg(), StepNorm.of(mask))
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in m.values())
    loss.backward()
    assert torch.isfinite(logp.grad).all()
