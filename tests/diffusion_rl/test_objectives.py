"""PRDP objective (diffusion_rl/objectives.py, METHODS.md D.3).

Hand-computed values (arithmetic in comments), a python-loop reference over pairs, micro-batch
invariance of the shares and the gradient of the proximal max.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from diffusion_rl.objectives import prdp
from shared.aggregation import StepNorm
from shared.config import AlgorithmConfig
from shared.objectives import OBJECTIVES

F64 = torch.float64


def _t(x):
    return torch.tensor(x, dtype=F64)


def _run(logp, old, ref, mask, rewards, gids, cfg, norm=None):
    norm = norm if norm is not None else StepNorm.of(mask)
    return prdp(logp, old, ref, None, mask, cfg, norm, group_ids=gids, rewards=rewards)


def reference(logp, old, ref, mask, rewards, gids, beta, eps, unclipped_only=False):
    """Plain python loops over groups and pairs (torch scalars so autograd works)."""
    b, t = logp.shape

    def rhat(i, clip):
        num, cnt = 0.0, 0
        for s in range(t):
            if mask[i, s] > 0:
                lp = logp[i, s]
                if clip:
                    lp = torch.clamp(lp, float(old[i, s]) - eps, float(old[i, s]) + eps)
                num = num + (lp - ref[i, s])
                cnt += 1
        return num / max(cnt, 1), cnt

    groups: dict[int, list[int]] = {}
    for i, g in enumerate(gids.tolist()):
        groups.setdefault(g, []).append(i)
    group_losses = []
    for members in groups.values():
        active = [i for i in members if float(mask[i].sum()) > 0]
        if not active:
            continue  # filler group
        pair_losses = []
        for i, j in itertools.combinations(active, 2):
            if float(rewards[i]) == float(rewards[j]):
                continue
            target = (float(rewards[i]) - float(rewards[j])) / beta
            l = (rhat(i, False)[0] - rhat(j, False)[0] - target) ** 2
            lc = (rhat(i, True)[0] - rhat(j, True)[0] - target) ** 2
            pair_losses.append(l if unclipped_only else torch.maximum(l, lc))
        group_losses.append(sum(pair_losses) / len(pair_losses) if pair_losses else logp.sum() * 0.0)
    return sum(group_losses) / len(group_losses)


def _random_batch(seed, n_groups=3, g=4, t=5, filler=True):
    gen = torch.Generator().manual_seed(seed)
    b = n_groups * g
    old = torch.randn(b, t, generator=gen, dtype=F64) * 0.3
    ref = old + torch.randn(b, t, generator=gen, dtype=F64) * 0.05
    # some steps near old (inside the clip), some far away
    logp = old + torch.randn(b, t, generator=gen, dtype=F64) * 0.15
    mask = (torch.rand(b, t, generator=gen) > 0.25).to(F64)
    mask[:, 0] = 1.0  # every real sample trains at least one step
    rewards = torch.randint(0, 3, (b,), generator=gen).to(F64) * 0.5  # many ties
    rewards[:g] = 1.0  # group 0: all rewards tied -> no valid pair
    rewards[g] = 0.0
    gids = torch.arange(n_groups).repeat_interleave(g) * 7 + 3  # arbitrary ids
    if filler:
        mask[-g:] = 0.0  # last group is dynamic-sampling filler
    return logp, old, ref, mask, rewards, gids


def test_registry():
    assert OBJECTIVES["prdp"] is prdp


def test_hand_computed_one_group():
    # beta = 0.5, eps = 0.1, 1 group of 3 samples, T = 2, full mask
    #             ref            old            logp          clamp(logp, old -+ 0.1)
    #   s0   [0.00,  0.00]  [0.00, 0.00]  [0.05, 0.30]   [0.05, 0.10]
    #   s1   [0.00,  0.00]  [0.00, 0.00]  [-0.20, 0.00]  [-0.10, 0.00]
    #   s2   [0.05, -0.05]  [0.15, 0.05]  [0.10, 0.10]   [0.10, 0.10]   (inside [0.05,0.25], [-0.05,0.15])
    # r_hat      = mean_t(logp - ref)  = [0.175, -0.1, (0.05 + 0.15)/2 = 0.1]
    # r_hat_clip = mean_t(clamp - ref) = [0.075, -0.05, 0.1]
    # rewards [1.0, 0.95, 1.1] -> targets (r_i - r_j)/beta:
    #   (0,1): 0.05/0.5 = 0.1    (0,2): -0.1/0.5 = -0.2    (1,2): -0.15/0.5 = -0.3
    # (0,1): l = (0.275 - 0.1)^2 = 0.030625   lclip = (0.125 - 0.1)^2 = 0.000625   max 0.030625
    # (0,2): l = (0.075 + 0.2)^2 = 0.075625   lclip = (-0.025 + 0.2)^2 = 0.030625  max 0.075625
    # (1,2): l = (-0.2 + 0.3)^2 = 0.01        lclip = (-0.15 + 0.3)^2 = 0.0225     max 0.0225 (clip)
    # loss = (0.030625 + 0.075625 + 0.0225)/3 = 0.12875/3
    ref = _t([[0.0, 0.0], [0.0, 0.0], [0.05, -0.05]])
    old = _t([[0.0, 0.0], [0.0, 0.0], [0.15, 0.05]])
    logp = _t([[0.05, 0.3], [-0.2, 0.0], [0.1, 0.1]])
    mask = torch.ones(3, 2, dtype=F64)
    rewards = _t([1.0, 0.95, 1.1])
    gids = torch.tensor([5, 5, 5])
    cfg = AlgorithmConfig(beta=0.5, prdp_eps=0.1)
    loss, m = _run(logp, old, ref, mask, rewards, gids, cfg)
    assert abs(loss.item() - 0.12875 / 3) < 1e-9
    # unclipped: (0.030625 + 0.075625 + 0.01)/3 = 0.11625/3; clip branch wins in 1 of 3 pairs
    assert abs(float(m["prdp_loss_unclipped"]) - 0.11625 / 3) < 1e-9
    assert abs(float(m["clip_frac"]) - 1 / 3) < 1e-9
    assert abs(float(m["valid_pair_frac"]) - 1.0) < 1e-9
    # |err| = 0.175, 0.275, 0.1 -> mean 0.55/3
    assert abs(float(m["reward_pred_gap"]) - 0.55 / 3) < 1e-9
    # kl_ref = token mean of logp - ref = (0.05 + 0.3 - 0.2 + 0 + 0.05 + 0.15)/6 = 0.35/6
    assert abs(float(m["kl_ref"]) - 0.35 / 6) < 1e-9


def test_hand_computed_tied_pair_and_mask():
    # same as above but rewards [1.0, 0.95, 1.0] (pair (0,2) tied -> dropped) and s0's step 1
    # masked out: r_hat_0 = 0.05, r_hat_clip_0 = 0.05 (mean over its one trained step)
    # (0,1): target 0.1; l = (0.05 + 0.1 - 0.1)^2 = 0.0025; lclip = (0.05 + 0.05 - 0.1)^2 = 0 -> 0.0025
    # (1,2): target -0.1; l = (-0.1 - 0.1 + 0.1)^2 = 0.01; lclip = (-0.05 - 0.1 + 0.1)^2 = 0.0025 -> 0.01
    # loss = (0.0025 + 0.01)/2 = 0.00625; valid_pair_frac = 2/3
    ref = _t([[0.0, 0.0], [0.0, 0.0], [0.05, -0.05]])
    old = _t([[0.0, 0.0], [0.0, 0.0], [0.15, 0.05]])
    logp = _t([[0.05, 0.3], [-0.2, 0.0], [0.1, 0.1]])
    mask = _t([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    loss, m = _run(logp, old, ref, mask, _t([1.0, 0.95, 1.0]), torch.tensor([0, 0, 0]),
                   AlgorithmConfig(beta=0.5, prdp_eps=0.1))
    assert abs(loss.item() - 0.00625) < 1e-9
    assert abs(float(m["valid_pair_frac"]) - 2 / 3) < 1e-9
    assert abs(float(m["clip_frac"])) < 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n_groups", [2, 3])
def test_matches_python_loop_reference(seed, n_groups):
    logp, old, ref, mask, rewards, gids = _random_batch(seed, n_groups=n_groups, filler=n_groups == 3)
    beta, eps = 0.7, 0.02
    cfg = AlgorithmConfig(beta=beta, prdp_eps=eps)
    lp1 = logp.clone().requires_grad_(True)
    loss, m = _run(lp1, old, ref, mask, rewards, gids, cfg)
    loss.backward()
    lp2 = logp.clone().requires_grad_(True)
    expected = reference(lp2, old, ref, mask, rewards, gids, beta, eps)
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-10
    torch.testing.assert_close(lp1.grad, lp2.grad, rtol=1e-9, atol=1e-12)
    assert loss.item() > 0
    # tied rewards are present (group 0 is all tied) but some pairs are valid
    assert 0.0 < m["valid_pair_frac"].item() < 1.0
    assert m["clip_frac"].item() < 1.0


def test_reference_inputs_exercise_both_branches_of_the_max():
    # over the inputs of the test above, the clipped branch wins for some pairs, not all
    fracs = []
    for seed, n_groups in itertools.product(range(4), (2, 3)):
        logp, old, ref, mask, rewards, gids = _random_batch(seed, n_groups=n_groups, filler=n_groups == 3)
        _, m = _run(logp, old, ref, mask, rewards, gids, AlgorithmConfig(beta=0.7, prdp_eps=0.02))
        fracs.append(m["clip_frac"].item())
    assert sum(f > 0 for f in fracs) >= 6 and max(fracs) < 1.0


def test_micro_batch_shares_sum_to_full_batch_loss_and_gradient():
    g = 3
    logp, old, ref, mask, rewards, gids = _random_batch(11, n_groups=4, g=g, filler=True)
    cfg = AlgorithmConfig(beta=0.3, prdp_eps=0.02)
    norm = StepNorm.of(mask)  # global counts of the whole step

    lp_full = logp.clone().requires_grad_(True)
    full, full_m = _run(lp_full, old, ref, mask, rewards, gids, cfg, norm)
    full.backward()
    full = full.detach()

    lp_mb = logp.clone().requires_grad_(True)
    total = 0.0
    metric_tot: dict[str, float] = {}
    for sl in (slice(0, g), slice(g, 3 * g), slice(3 * g, 4 * g)):  # 1 group, 2 groups, filler
        share, m = _run(lp_mb[sl], old[sl], ref[sl], mask[sl], rewards[sl], gids[sl], cfg, norm)
        share.backward()  # gradient accumulation
        total = total + share.item()
        for k, v in m.items():
            metric_tot[k] = metric_tot.get(k, 0.0) + float(v)
    assert abs(total - float(full)) < 1e-12
    torch.testing.assert_close(lp_mb.grad, lp_full.grad, rtol=0, atol=1e-12)
    for k, v in full_m.items():
        assert abs(metric_tot[k] - float(v)) < 1e-12, k
    # and equals the loop reference (mean over the 3 real groups; the filler group is ignored)
    assert abs(float(full) - float(reference(logp, old, ref, mask, rewards, gids, 0.3, 0.02))) < 1e-10


def test_gradient_inside_clip_equals_unclipped_gradient():
    # logp == old_logp: every clamp is inactive, l == lclip, and the max's gradient is l's gradient
    _, old, ref, mask, rewards, gids = _random_batch(5, n_groups=3, filler=False)
    beta, eps = 0.5, 0.01
    lp1 = old.clone().requires_grad_(True)
    loss, m = _run(lp1, old, ref, mask, rewards, gids, AlgorithmConfig(beta=beta, prdp_eps=eps))
    loss.backward()
    lp2 = old.clone().requires_grad_(True)
    reference(lp2, old, ref, mask, rewards, gids, beta, eps, unclipped_only=True).backward()
    torch.testing.assert_close(lp1.grad, lp2.grad, rtol=1e-9, atol=1e-12)
    assert float(lp1.grad.abs().sum()) > 0
    assert float(m["clip_frac"]) == 0.0
    assert abs(m["prdp_loss_unclipped"].item() - loss.item()) < 1e-12


def test_gradient_zero_when_far_outside_clip_and_clipped_loss_larger():
    # group 0 (ids 0): T = 1, ref = old = 0, eps = 0.1, beta = 1, rewards (1, 0): target 1
    #   logp = (0.9, -0.5): both outside [-0.1, 0.1] -> clamp = (0.1, -0.1)
    #   l = (1.4 - 1)^2 = 0.16 < lclip = (0.2 - 1)^2 = 0.64 -> max is the constant clipped branch
    # group 1 (ids 1): logp == old -> ordinary, non-zero gradient
    logp = _t([[0.9], [-0.5], [0.0], [0.0]]).requires_grad_(True)
    old = _t([[0.0], [0.0], [0.0], [0.0]])
    ref = _t([[0.0], [0.0], [0.05], [-0.05]])
    mask = torch.ones(4, 1, dtype=F64)
    rewards = _t([1.0, 0.0, 1.0, 0.0])
    gids = torch.tensor([0, 0, 1, 1])
    loss, m = _run(logp, old, ref, mask, rewards, gids, AlgorithmConfig(beta=1.0, prdp_eps=0.1))
    loss.backward()
    # group 1: r_hat = (-0.05, 0.05): l = (-0.1 - 1)^2 = 1.21; loss = (0.64 + 1.21)/2
    assert abs(loss.item() - (0.64 + 1.21) / 2) < 1e-12
    assert logp.grad[:2].abs().max() == 0.0
    # d/dlogp_2 of 1.21/2 through r_hat_2 - r_hat_3: 2 * (-1.1) / 2 = -1.1, and +1.1 for sample 3
    torch.testing.assert_close(logp.grad[2:], _t([[-1.1], [1.1]]), rtol=0, atol=1e-12)
    assert abs(float(m["clip_frac"]) - 0.5) < 1e-12  # clip branch in group 0's only pair


def test_beta_zero_raises():
    logp, old, ref, mask, rewards, gids = _random_batch(0, n_groups=2, filler=False)
    with pytest.raises(ValueError, match="beta"):
        _run(logp, old, ref, mask, rewards, gids, AlgorithmConfig(beta=0.0))


def test_missing_reference_or_unequal_groups_raise():
    logp, old, ref, mask, rewards, gids = _random_batch(0, n_groups=2, filler=False)
    cfg = AlgorithmConfig(beta=0.1)
    with pytest.raises(ValueError):
        prdp(logp, old, None, None, mask, cfg, StepNorm.of(mask), group_ids=gids, rewards=rewards)
    bad = gids.clone()
    bad[0] = gids[-1]  # sizes 3 and 5
    with pytest.raises(ValueError, match="equal size"):
        _run(logp, old, ref, mask, rewards, bad, cfg)


def test_all_equal_rewards_give_zero_loss():
    logp, old, ref, mask, _, gids = _random_batch(3, n_groups=2, filler=False)
    lp = logp.clone().requires_grad_(True)
    loss, m = _run(lp, old, ref, mask, torch.full((logp.shape[0],), 0.7, dtype=F64), gids,
                   AlgorithmConfig(beta=0.2, prdp_eps=1e-3))
    loss.backward()
    assert loss.item() == 0.0
    assert float(lp.grad.abs().max()) == 0.0
    assert float(m["valid_pair_frac"]) == 0.0


def test_float32_inputs():
    logp, old, ref, mask, rewards, gids = _random_batch(7, n_groups=3, filler=True)
    cfg = AlgorithmConfig(beta=0.7, prdp_eps=0.05)
    l64, _ = _run(logp, old, ref, mask, rewards, gids, cfg)
    l32, m32 = _run(logp.float(), old.float(), ref.float(), mask.float(), rewards.float(), gids, cfg)
    assert l32.dtype == torch.float32 and all(v.dtype == torch.float32 for v in m32.values())
    assert abs(float(l32) - float(l64)) < 1e-5 * max(1.0, float(l64))
