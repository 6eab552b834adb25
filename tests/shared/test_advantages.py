"""Advantage estimators (shared/advantages.py, METHODS.md A "Advantages").

Hand-computed values with the arithmetic in comments, plus a plain python-loop reference.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from shared.advantages import (
    ADVANTAGES,
    batch_std,
    compute_advantages,
    dr_grpo,
    group_stats,
    grpo,
    none,
    rloo,
    zero_std_group_fraction,
)

# Two groups of different sizes with interleaved (non-contiguous) ids:
#   position : 0  1  2  3  4  5  6
#   group id : 7  3  7  3  7  3  3
#   reward   : 1  2  2  6  3  6  6
# group 7 = {1, 2, 3}:     mean 2, deviations (-1, 0, 1), unbiased var (1+0+1)/2 = 1, std 1
# group 3 = {2, 6, 6, 6}:  mean 20/4 = 5, deviations (-3, 1, 1, 1), var (9+1+1+1)/3 = 4, std 2
REWARDS = [1.0, 2.0, 2.0, 6.0, 3.0, 6.0, 6.0]
GIDS = [7, 3, 7, 3, 7, 3, 3]


def _example(dtype=torch.float64):
    return torch.tensor(REWARDS, dtype=dtype), torch.tensor(GIDS)


def test_group_stats_hand():
    r, g = _example()
    mean, std, count = group_stats(r, g)
    torch.testing.assert_close(mean, torch.tensor([2.0, 5, 2, 5, 2, 5, 5], dtype=torch.float64))
    torch.testing.assert_close(std, torch.tensor([1.0, 2, 1, 2, 1, 2, 2], dtype=torch.float64))
    torch.testing.assert_close(count, torch.tensor([3.0, 4, 3, 4, 3, 4, 4], dtype=torch.float64))


def test_grpo_hand():
    r, g = _example()
    # eps = 0: A = deviation / group std
    #   group 7: (-1, 0, 1) / 1        -> -1, 0, 1         at positions 0, 2, 4
    #   group 3: (-3, 1, 1, 1) / 2     -> -1.5, .5, .5, .5 at positions 1, 3, 5, 6
    expected = torch.tensor([-1.0, -1.5, 0.0, 0.5, 1.0, 0.5, 0.5], dtype=torch.float64)
    torch.testing.assert_close(grpo(r, g, eps=0.0), expected, rtol=0, atol=1e-12)


def test_grpo_default_eps_is_1e6():
    r, g = _example()
    # default eps 1e-6: A = dev / (std + 1e-6)
    dev = torch.tensor([-1.0, -3.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    std = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(grpo(r, g), dev / (std + 1e-6), rtol=0, atol=1e-15)
    # the default is really applied (differs from eps=0 by ~dev*eps/std^2 ~ 1e-6)
    assert (grpo(r, g) - grpo(r, g, eps=0.0)).abs().max() > 1e-7


def test_grpo_large_eps():
    # group {0, 2}: mean 1, deviations (-1, 1), unbiased std sqrt((1+1)/1) = sqrt(2)
    # eps = 0.5: A = +-1 / (sqrt(2) + 0.5) = +-0.522407...
    r = torch.tensor([0.0, 2.0], dtype=torch.float64)
    g = torch.tensor([0, 0])
    a = 1.0 / (math.sqrt(2.0) + 0.5)
    torch.testing.assert_close(grpo(r, g, eps=0.5), torch.tensor([-a, a], dtype=torch.float64))
    # eps is ignored by dr_grpo / rloo / none
    torch.testing.assert_close(dr_grpo(r, g, eps=0.5), torch.tensor([-1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(rloo(r, g, eps=0.5), torch.tensor([-2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(none(r, g, eps=0.5), r)


def test_dr_grpo_hand():
    r, g = _example()
    # A = r - group mean: group 7 (-1, 0, 1), group 3 (-3, 1, 1, 1)
    expected = torch.tensor([-1.0, -3.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(dr_grpo(r, g), expected, rtol=0, atol=1e-12)


def test_batch_std_hand():
    r, g = _example()
    # batch std (unbiased) of (1, 2, 2, 6, 3, 6, 6):
    #   sum = 26, sum of squares = 1+4+4+36+9+36+36 = 126
    #   SS  = 126 - 26^2/7 = (882 - 676)/7 = 206/7,  var = SS/6 = 103/21,  std = sqrt(103/21) ~ 2.21467
    std = math.sqrt(103.0 / 21.0)
    dev = torch.tensor([-1.0, -3.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(batch_std(r, g, eps=0.0), dev / std, rtol=0, atol=1e-12)
    torch.testing.assert_close(batch_std(r, g), dev / (std + 1e-6), rtol=0, atol=1e-12)


def test_rloo_hand():
    r, g = _example()
    # A_i = r_i - (sum_g - r_i) / (G - 1)
    #   group 7 (sum 6, G 3):  r=1: 1 - 5/2 = -1.5;  r=2: 2 - 4/2 = 0;  r=3: 3 - 3/2 = 1.5
    #   group 3 (sum 20, G 4): r=2: 2 - 18/3 = -4;   r=6: 6 - 14/3 = 4/3
    # (equivalently G/(G-1) * (r_i - mean_g))
    expected = torch.tensor([-1.5, -4.0, 0.0, 4 / 3, 1.5, 4 / 3, 4 / 3], dtype=torch.float64)
    torch.testing.assert_close(rloo(r, g), expected, rtol=0, atol=1e-12)


def test_none_is_raw_reward_copy():
    r, g = _example()
    out = none(r, g)
    torch.testing.assert_close(out, r)
    out[0] = 99.0
    assert r[0] == 1.0  # a copy, not a view


def _extras(r):
    """Per-sample extras the baseline and filter estimators need (ignored by the others)."""
    return {"baseline": torch.full_like(r, 0.25), "unique": torch.ones_like(r), "progress_bonus": torch.full_like(r, 0.1),
            "step_values": torch.stack([torch.full_like(r, float("nan")), r], 1)}  # per_step: only final values


def test_registry_and_dispatch():
    assert set(ADVANTAGES) == {"grpo", "dr_grpo", "batch_std", "rloo", "none", "remax", "alol", "expert_iteration", "raft",
                               "per_step", "mrt"}
    r, g = _example()
    for name, fn in ADVANTAGES.items():
        needed = {k: v for k, v in _extras(r).items() if k in getattr(fn, "needs", ())}
        torch.testing.assert_close(compute_advantages(name, r, g, 1e-3, **_extras(r)), fn(r, g, 1e-3, **needed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_dtype_follows_input(dtype):
    r, g = _example(dtype)
    for name in ADVANTAGES:
        assert compute_advantages(name, r, g, **_extras(r)).dtype == dtype


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "batch_std", "rloo"])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 0.7, 1 / 3, -2.5])
def test_equal_reward_group_gives_exact_zero_float32(name, value):
    # group 0 = three equal rewards (interleaved with group 1, which varies)
    r = torch.tensor([value, 1.0, value, 0.0, value], dtype=torch.float32)
    g = torch.tensor([0, 1, 0, 1, 0])
    a = compute_advantages(name, r, g)
    assert torch.equal(a[[0, 2, 4]], torch.zeros(3))
    assert (a[[1, 3]] != 0).all()


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "batch_std", "rloo"])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.5, -2.5])
def test_equal_reward_group_gives_exact_zero_float64_dyadic(name, value):
    r = torch.tensor([value, 1.0, value, 0.0, value], dtype=torch.float64)
    g = torch.tensor([0, 1, 0, 1, 0])
    a = compute_advantages(name, r, g)
    assert torch.equal(a[[0, 2, 4]], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_equal_reward_group_gives_exact_zero_float64_non_dyadic(name):
    r = torch.tensor([0.1, 1.0, 0.1, 0.0, 0.1], dtype=torch.float64)
    g = torch.tensor([0, 1, 0, 1, 0])
    a = compute_advantages(name, r, g)
    assert torch.equal(a[[0, 2, 4]], torch.zeros(3, dtype=torch.float64))


def test_zero_std_group_fraction_float64_non_dyadic():
    r = torch.tensor([0.1, 1.0, 0.1, 0.0, 0.1], dtype=torch.float64)
    g = torch.tensor([0, 1, 0, 1, 0])
    assert zero_std_group_fraction(r, g) == pytest.approx(0.5)


def test_equal_reward_group_zero_with_eps_zero():
    r = torch.tensor([0.5, 1.0, 0.5, 0.0], dtype=torch.float64)
    g = torch.tensor([0, 1, 0, 1])
    assert torch.equal(grpo(r, g, eps=0.0)[[0, 2]], torch.zeros(2, dtype=torch.float64))


def test_rloo_raises_for_group_of_one():
    r = torch.tensor([1.0, 2.0, 3.0])
    g = torch.tensor([0, 0, 5])  # group 5 has a single sample
    with pytest.raises(ValueError, match="at least 2"):
        rloo(r, g)
    with pytest.raises(ValueError):
        compute_advantages("rloo", r, g)


def test_singleton_group_grpo_and_dr_grpo_are_zero():
    # a group of one has std 0 by definition and deviation 0, so A = 0 / (0 + eps) = 0
    r = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    g = torch.tensor([0, 0, 5])
    assert grpo(r, g)[2] == 0.0
    assert dr_grpo(r, g)[2] == 0.0
    _, std, count = group_stats(r, g)
    assert std[2] == 0.0 and count[2] == 1.0


def _loop_reference(name, rewards, gids, eps):
    """Plain python loops; statistics.stdev is the unbiased (n-1) sample std."""
    groups: dict[int, list[float]] = {}
    for r, gid in zip(rewards, gids):
        groups.setdefault(gid, []).append(r)
    batch_sd = statistics.stdev(rewards)
    out = []
    for r, gid in zip(rewards, gids):
        grp = groups[gid]
        mean = sum(grp) / len(grp)
        sd = statistics.stdev(grp) if len(grp) > 1 else 0.0
        if name == "grpo":
            out.append((r - mean) / (sd + eps))
        elif name == "dr_grpo":
            out.append(r - mean)
        elif name == "batch_std":
            out.append((r - mean) / (batch_sd + eps))
        elif name == "rloo":
            out.append(r - (sum(grp) - r) / (len(grp) - 1))
        elif name == "none":
            out.append(r)
    return out


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "batch_std", "rloo", "none"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_against_loop_reference(name, seed):
    gen = torch.Generator().manual_seed(seed)
    n = 40
    # random group ids in a shuffled order with random group sizes >= 2
    sizes = (torch.randint(2, 8, (8,), generator=gen)).tolist()
    gids = [gid * 11 + 3 for gid, s in enumerate(sizes) for _ in range(s)]
    perm = torch.randperm(len(gids), generator=gen).tolist()
    gids = [gids[p] for p in perm][:n]
    # make sure no group got cut to a single sample (rloo needs >= 2)
    counts = {gid: gids.count(gid) for gid in gids}
    gids = [gid for gid in gids if counts[gid] >= 2]
    rewards = torch.randn(len(gids), generator=gen, dtype=torch.float64)
    eps = 1e-3
    got = compute_advantages(name, rewards, torch.tensor(gids), eps)
    ref = torch.tensor(_loop_reference(name, rewards.tolist(), gids, eps), dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_random_float32_against_loop_reference():
    gen = torch.Generator().manual_seed(7)
    gids = [0, 1, 2, 0, 1, 2, 2, 1, 0, 0, 3, 3]
    rewards = torch.rand(len(gids), generator=gen)  # float32, like a [0,1] reward
    ref = _loop_reference("grpo", [float(x) for x in rewards], gids, 1e-6)
    got = grpo(rewards, torch.tensor(gids))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_zero_std_group_fraction():
    # groups: 4 -> (1, 1, 1) all equal;  9 -> (0, 1) varied;  2 -> (0.5, 0.5) all equal; 6 -> (3, 0, 3) varied
    r = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 0.5, 3.0, 0.0, 3.0, 1.0])
    g = torch.tensor([4, 9, 2, 4, 9, 2, 6, 6, 6, 4])
    # 2 of 4 groups are zero-std
    assert zero_std_group_fraction(r, g) == pytest.approx(0.5)
    # all varied -> 0; all equal -> 1
    assert zero_std_group_fraction(torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([1, 0, 1, 0])) == 0.0
    assert zero_std_group_fraction(torch.tensor([5.0, 5.0, 2.0, 2.0]), torch.tensor([1, 0, 0, 1])) == 0.0
    assert zero_std_group_fraction(torch.tensor([5.0, 2.0, 5.0, 2.0]), torch.tensor([1, 0, 1, 0])) == 1.0


def test_zero_std_group_fraction_counts_singleton_as_zero_std():
    # a group of one sample has std 0 (its rewards are trivially all equal)
    r = torch.tensor([0.0, 1.0, 7.0])
    g = torch.tensor([0, 0, 1])
    assert zero_std_group_fraction(r, g) == pytest.approx(0.5)


def test_zero_std_group_fraction_empty_input():
    assert zero_std_group_fraction(torch.zeros(0), torch.zeros(0, dtype=torch.long)) == 0.0
