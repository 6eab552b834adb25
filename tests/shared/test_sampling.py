"""Counter-based Gumbel sampling (shared/sampling.py): noise, logit warping, sampled distribution."""

from __future__ import annotations

import math

import pytest
import torch

from shared.sampling import (CounterSamplingProcessor, _mix32, counter_uniform, inverse_cdf, row_keys, sample_tokens,
                             warp_logits)


PINNED_U = [0.12173103914944183, 0.6366170194024097, 0.9428214457088863]  # counter_uniform(0, [0, 1, 2**40], 0)


def _ids(*xs):
    return torch.tensor(xs, dtype=torch.long)


# ---------------------------------------------------------------- counter_uniform


def _ks_uniform(u: torch.Tensor) -> float:
    """Kolmogorov-Smirnov statistic of draws `u` against U[0, 1)."""
    u = u.double().sort().values
    n = u.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - u).max().item(), (u - (i - 1) / n).max().item())


def _chi2(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return ((counts.double() - expected) ** 2 / expected).sum().item()


def test_counter_uniform_half_open_unit_interval_float64_53_bits():
    u = counter_uniform(0, torch.arange(50000), 3)
    assert u.shape == (50000,) and u.dtype == torch.float64
    assert (u >= 0).all() and (u < 1).all()
    k = u * 2.0**53
    assert torch.equal(k, k.floor())  # a multiple of 2**-53 ...
    assert (k % 2 == 1).any()  # ... using the lowest bit too


def test_counter_uniform_is_uniform_ks_and_chi2():
    """Over sample ids, positions and seeds, u passes Kolmogorov-Smirnov and a 100-bin chi-square at the
    0.1% level (deterministic: the hash has no randomness, so these are fixed draws); so do its low bits."""
    n = 20000
    crit_ks = 1.95 / math.sqrt(n)  # KS 0.1% critical value
    crit_chi2_99 = 148.2  # chi-square, 99 dof, 99.9% quantile
    draws = {"ids": counter_uniform(7, torch.arange(n), 0),
             "positions": torch.cat([counter_uniform(7, torch.arange(100), p) for p in range(n // 100)]),
             "seeds": torch.cat([counter_uniform(s, torch.arange(100), 5) for s in range(n // 100)])}
    for name, u in draws.items():
        assert _ks_uniform(u) < crit_ks, name
        counts = torch.bincount((u * 100).long(), minlength=100)
        assert _chi2(counts, torch.full((100,), n / 100.0)) < crit_chi2_99, name
        low = (u * 2.0**32) % 1.0  # bits 33..53
        assert _ks_uniform(low) < crit_ks, f"{name}: low bits"


def test_counter_uniform_neighbours_independent():
    """Joint 10x10 chi-square of u at consecutive positions of one sample, and of consecutive sample ids:
    the hash must not correlate the draws a completion makes, nor the samples of one group."""
    n = 20000
    crit = 148.2  # 99 dof, 99.9% quantile
    ids = torch.arange(n)
    pairs = [(counter_uniform(1, ids, 4), counter_uniform(1, ids, 5)),
             (counter_uniform(1, ids[0::2], 4), counter_uniform(1, ids[1::2], 4)),
             (counter_uniform(1, ids, 4), counter_uniform(2, ids, 4))]
    for a, b in pairs:
        cell = (a * 10).long() * 10 + (b * 10).long()
        assert _chi2(torch.bincount(cell, minlength=100), torch.full((100,), len(a) / 100.0)) < crit


def test_counter_uniform_extreme_arguments_stay_in_range():
    ids = _ids(0, 1, 2**31 - 1, 2**32 - 1, 2**40)
    for seed in (0, -1, 2**31, 2**33 + 5):
        for position in (0, 10**6, 2**32 + 3):
            u = counter_uniform(seed, ids, position)
            assert (u >= 0).all() and (u < 1).all()


def test_counter_uniform_deterministic_and_keys_shortcut():
    ids = _ids(0, 5, 11)
    a = counter_uniform(42, ids, 2)
    assert torch.equal(a, counter_uniform(42, ids.clone(), 2))
    assert torch.equal(a, counter_uniform(42, ids, 2, keys=row_keys(42, ids)))


def test_counter_uniform_python_int_and_tensor_hash_agree():
    # The scalar parts (seed, position) are hashed on the host: same arithmetic as the int64 tensor path.
    xs = [0, 1, 12345, 2**31 - 1, 2**32 - 1]
    assert _mix32(torch.tensor(xs)).tolist() == [_mix32(x) for x in xs]


def test_counter_uniform_depends_on_each_argument():
    ids = _ids(0, 1, 2, 3)
    base = counter_uniform(1, ids, 0)
    assert base.unique().numel() == 4  # sample id
    assert not torch.isclose(base, counter_uniform(2, ids, 0)).any()  # seed
    assert not torch.isclose(base, counter_uniform(1, ids, 1)).any()  # position
    assert not torch.isclose(base, counter_uniform(1, ids + 4, 0)).any()


def test_counter_uniform_independent_of_batch_composition():
    alone = counter_uniform(123, _ids(7), 4)
    batch = counter_uniform(123, _ids(3, 7, 9), 4)
    other = counter_uniform(123, _ids(7, 100, 200, 300), 4)
    assert torch.equal(alone[0], batch[1])
    assert torch.equal(alone[0], other[0])
    # Ids that differ only above bit 32 (second attempts, MRT, step-value continuations) get their own noise.
    assert not torch.isclose(counter_uniform(123, _ids(7, 8), 4), counter_uniform(123, _ids(7, 8) + 2**40, 4)).any()
    # Also for the full sampling path.
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    tok_batch = sample_tokens(logits, 123, _ids(3, 7, 9), 4)
    tok_alone = sample_tokens(logits[1:2], 123, _ids(7), 4)
    assert tok_batch[1] == tok_alone[0]


def test_counter_uniform_pinned_values():
    # The noise is part of the reproducibility contract (runs resume and re-run identically): a change to the
    # hash changes every rollout, so it must be deliberate. Values of this implementation:
    assert counter_uniform(0, _ids(0, 1, 2**40), 0).tolist() == PINNED_U


# ---------------------------------------------------------------- warp_logits


def _logits(probs):
    return torch.tensor([probs], dtype=torch.float32).log()


def _kept(x):
    return torch.isfinite(x[0]).tolist()


def test_warp_identity_by_default():
    x = torch.randn(3, 7)
    assert torch.equal(warp_logits(x), x.float())


def test_warp_temperature_scales():
    x = torch.randn(3, 7)
    torch.testing.assert_close(warp_logits(x, temperature=0.5), x * 2.0)
    torch.testing.assert_close(warp_logits(x, temperature=2.0), x / 2.0)


def test_warp_casts_to_float32():
    x = torch.randn(2, 5, dtype=torch.bfloat16)
    assert warp_logits(x).dtype == torch.float32


def test_warp_top_k():
    x = _logits([0.15, 0.5, 0.05, 0.3])
    assert _kept(warp_logits(x, top_k=1)) == [False, True, False, False]
    assert _kept(warp_logits(x, top_k=2)) == [False, True, False, True]
    assert _kept(warp_logits(x, top_k=3)) == [True, True, False, True]
    # top_k >= V and top_k = 0 are no-ops.
    assert all(_kept(warp_logits(x, top_k=4)))
    assert all(_kept(warp_logits(x, top_k=10)))
    assert all(_kept(warp_logits(x, top_k=0)))
    # Kept entries keep their (temperature-scaled) values.
    w = warp_logits(x, temperature=0.5, top_k=2)
    torch.testing.assert_close(w[0, [1, 3]], x[0, [1, 3]] * 2)


def test_warp_top_k_per_row():
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    w = warp_logits(x, top_k=1)
    assert torch.isfinite(w).tolist() == [[False, False, True], [True, False, False]]


def test_warp_top_p():
    x = _logits([0.5, 0.3, 0.15, 0.05])
    assert _kept(warp_logits(x, top_p=0.8)) == [True, True, False, False]
    assert _kept(warp_logits(x, top_p=0.75)) == [True, True, False, False]
    assert _kept(warp_logits(x, top_p=0.3)) == [True, False, False, False]
    assert _kept(warp_logits(x, top_p=0.85)) == [True, True, True, False]
    assert _kept(warp_logits(x, top_p=0.99)) == [True, True, True, True]
    assert _kept(warp_logits(x, top_p=1.0)) == [True, True, True, True]
    # Tiny top_p still keeps the argmax.
    assert _kept(warp_logits(x, top_p=1e-6)) == [True, False, False, False]


def test_warp_top_p_unsorted_and_batched():
    x = torch.cat([_logits([0.05, 0.3, 0.15, 0.5]), _logits([0.15, 0.05, 0.5, 0.3])])
    w = warp_logits(x, top_p=0.8)
    assert torch.isfinite(w).tolist() == [[False, True, False, True], [False, False, True, True]]


def test_warp_top_p_applied_after_temperature():
    # probs [0.5, 0.3, 0.15, 0.05]; T=0.5 sharpens to ~[0.69, 0.25, 0.06, 0.007], so 0.8 keeps 2,
    # while T=2 flattens to ~[0.36, 0.28, 0.20, 0.11] (cumulative before the 3rd: 0.64) and keeps 3.
    x = _logits([0.5, 0.3, 0.15, 0.05])
    assert _kept(warp_logits(x, temperature=0.5, top_p=0.8)) == [True, True, False, False]
    assert _kept(warp_logits(x, temperature=2.0, top_p=0.8)) == [True, True, True, False]


def test_warp_top_k_and_top_p_combined():
    x = _logits([0.5, 0.3, 0.15, 0.05])
    assert _kept(warp_logits(x, top_k=3, top_p=0.99)) == [True, True, True, False]
    assert _kept(warp_logits(x, top_k=3, top_p=0.4)) == [True, False, False, False]


# ---------------------------------------------------------------- sample_tokens


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sample_tokens_distribution_matches_softmax(temperature):
    n = 20000
    logits = torch.tensor([1.0, 0.2, -0.5, 0.4])
    toks = sample_tokens(logits.expand(n, 4), seed=11, sample_ids=torch.arange(n), position=3,
                         temperature=temperature)
    assert toks.shape == (n,) and toks.dtype == torch.long
    freq = torch.bincount(toks, minlength=4).double() / n
    p = torch.softmax(logits.double() / temperature, -1)
    assert (freq - p).abs().max().item() < 0.015
    # Chi-square with 3 dof: 99.9% quantile is 16.27.
    counts = freq * n
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert chi2 < 16.27


def test_sample_tokens_distribution_matches_softmax_larger_vocab():
    # 30 tokens, draws over sample ids and positions: chi-square (29 dof) below its 99.9% quantile.
    V, n = 30, 30000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(3)) * 1.5
    toks = torch.cat([sample_tokens(logits.expand(n // 3, V), 5, torch.arange(n // 3), pos, temperature=0.8)
                      for pos in range(3)])
    p = torch.softmax(logits.double() / 0.8, -1)
    assert _chi2(torch.bincount(toks, minlength=V), n * p) < 58.3


def _inverse_cdf_loop(z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Plain reference: walk each row, accumulating exp(z - max) (float32 values) in Python floats (float64)."""
    out = []
    for row, ub in zip(z, u.tolist()):
        e = (row - row.max()).exp().tolist()
        total = sum(e)  # sequential, like cumsum
        target, acc, pick = ub * total, 0.0, None
        for v, ev in enumerate(e):
            acc += ev
            if acc > target:
                pick = v
                break
        if pick is None:  # target rounded up to the total: the last token with positive mass
            pick = max(v for v, ev in enumerate(e) if ev > 0)
        out.append(pick)
    return torch.tensor(out)


def test_inverse_cdf_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 37, generator=g) * 3
    z[::3, -5:] = float("-inf")  # filtered tails
    z[1::4, :4] = float("-inf")  # filtered heads
    u = torch.rand(64, generator=g, dtype=torch.float64)
    u[:4] = torch.tensor([0.0, 1 - 2.0**-53, 0.5, 1e-300], dtype=torch.float64)
    assert torch.equal(inverse_cdf(z, u), _inverse_cdf_loop(z, u))


def test_inverse_cdf_never_draws_zero_probability_tokens():
    z = torch.tensor([[float("-inf"), 1.0, 0.5, float("-inf"), float("-inf")]] * 3)
    u = torch.tensor([0.0, 0.5, 1 - 2.0**-53], dtype=torch.float64)
    assert inverse_cdf(z, u).tolist() == [1, 1, 2]
    # A single kept token is drawn whatever u is.
    z1 = torch.full((3, 6), float("-inf"))
    z1[:, 4] = 0.0
    assert inverse_cdf(z1, u).tolist() == [4, 4, 4]


def test_inverse_cdf_keeps_tail_mass_behind_a_large_token():
    """Accumulated in float32, a cumulative sum near 1 drops increments below half an ulp (3e-8): here 1000 tail
    tokens of probability 2e-9 each would never be drawn. Float64 keeps them: u just past the head's mass
    lands on the tail token whose cumulative interval holds it."""
    V = 1001
    z = torch.full((1, V), -20.0)
    z[0, 0] = 0.0
    p = torch.softmax(z.double(), -1)[0]
    cum = p.cumsum(0)
    for k in (1, 500, 1000):
        u = ((cum[k - 1] + cum[k]) / 2).reshape(1)  # the middle of token k's interval
        assert inverse_cdf(z, u).item() == k
    widths32 = z.softmax(-1).cumsum(-1)[0].diff()  # float32 output: most tail tokens get no interval at all
    assert (widths32 == 0).float().mean() > 0.9


def test_sample_tokens_respects_top_k_top_p():
    n = 4000
    logits = _logits([0.5, 0.3, 0.15, 0.05]).expand(n, 4)
    toks = sample_tokens(logits, 0, torch.arange(n), 0, top_p=0.8)
    assert set(toks.tolist()) == {0, 1}
    freq0 = (toks == 0).double().mean().item()
    assert abs(freq0 - 0.5 / 0.8) < 0.03  # renormalised over the nucleus
    toks = sample_tokens(logits, 0, torch.arange(n), 0, top_k=1)
    assert (toks == 0).all()


def test_sample_tokens_position_and_seed_change_samples():
    n = 500
    logits = torch.zeros(n, 6)
    a = sample_tokens(logits, 1, torch.arange(n), 0)
    assert torch.equal(a, sample_tokens(logits, 1, torch.arange(n), 0))
    assert (a != sample_tokens(logits, 1, torch.arange(n), 1)).float().mean() > 0.5
    assert (a != sample_tokens(logits, 2, torch.arange(n), 0)).float().mean() > 0.5


# ---------------------------------------------------------------- CounterSamplingProcessor


def test_processor_one_finite_entry_per_row():
    B, V, Lp = 5, 13, 4
    scores = torch.randn(B, V)
    proc = CounterSamplingProcessor(seed=3, sample_ids=torch.arange(10, 10 + B), prompt_len=Lp,
                                    temperature=0.9, top_k=0, top_p=1.0)
    input_ids = torch.zeros(B, Lp + 2, dtype=torch.long)
    out = proc(input_ids, scores)
    assert out.shape == (B, V)
    finite = torch.isfinite(out)
    assert (finite.sum(-1) == 1).all()
    assert (out[finite] == 0).all()
    # The finite entry is the sampled token at completion position = generated length (2).
    expected = sample_tokens(scores, 3, torch.arange(10, 10 + B), 2, 0.9)
    assert torch.equal(out.argmax(-1), expected)
    # Greedy argmax of the processed scores gives exactly that token; top_k=1 gives the raw argmax.
    proc_k1 = CounterSamplingProcessor(3, torch.arange(B), Lp, 1.0, 1, 1.0)
    assert torch.equal(proc_k1(input_ids, scores).argmax(-1), scores.argmax(-1))


def test_processor_position_counts_generated_tokens():
    B, V, Lp = 3, 9, 5
    scores = torch.zeros(B, V)
    proc = CounterSamplingProcessor(0, torch.arange(B), Lp, 1.0, 0, 1.0)
    for step in range(3):
        out = proc(torch.zeros(B, Lp + step, dtype=torch.long), scores)
        assert torch.equal(out.argmax(-1), sample_tokens(scores, 0, torch.arange(B), step))


def test_processor_does_not_mutate_scores():
    scores = torch.randn(2, 6)
    before = scores.clone()
    CounterSamplingProcessor(0, torch.arange(2), 1, 1.0, 0, 1.0)(torch.zeros(2, 1, dtype=torch.long), scores)
    assert torch.equal(scores, before)
    assert math.isfinite(before.sum().item())
