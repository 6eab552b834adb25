"""Counter-based Gumbel sampling (shared/sampling.py): noise, logit warping, sampled distribution."""

from __future__ import annotations

import math

import pytest
import torch

from shared.sampling import CounterSamplingProcessor, counter_uniform, gumbel_noise, sample_tokens, warp_logits


def _ids(*xs):
    return torch.tensor(xs, dtype=torch.long)


# ---------------------------------------------------------------- counter_uniform


def test_counter_uniform_in_open_unit_interval_and_float64():
    u = counter_uniform(0, torch.arange(64), 3, 500)
    assert u.shape == (64, 500)
    assert u.dtype == torch.float64
    assert (u > 0).all() and (u < 1).all()
    # Roughly uniform: mean ~ 1/2, var ~ 1/12 over 32000 draws.
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.var().item() - 1 / 12) < 0.005
    # Gumbel noise is finite everywhere.
    assert torch.isfinite(gumbel_noise(0, torch.arange(64), 3, 500)).all()


def test_counter_uniform_extreme_arguments_stay_in_range():
    ids = _ids(0, 1, 2**31 - 1, 2**32 - 1, 2**40)
    for seed in (0, -1, 2**31, 2**33 + 5):
        u = counter_uniform(seed, ids, 10**6, 7)
        assert (u > 0).all() and (u < 1).all()


def test_counter_uniform_deterministic():
    ids = _ids(0, 5, 11)
    a = counter_uniform(42, ids, 2, 33)
    b = counter_uniform(42, ids.clone(), 2, 33)
    assert torch.equal(a, b)


def test_counter_uniform_depends_on_each_argument():
    ids = _ids(0, 1, 2, 3)
    base = counter_uniform(1, ids, 0, 16)
    # seed
    assert not torch.isclose(base, counter_uniform(2, ids, 0, 16)).any()
    # position
    assert not torch.isclose(base, counter_uniform(1, ids, 1, 16)).any()
    # sample id: rows differ from one another and from shifted ids
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.isclose(base[i], base[j]).any()
    assert not torch.isclose(base, counter_uniform(1, ids + 4, 0, 16)).any()
    # vocab index: entries within a row are distinct
    for row in base:
        assert row.unique().numel() == row.numel()


def test_counter_uniform_vocab_prefix_consistent():
    # Entry (b, v) is a function of v alone, not of the vocabulary size.
    ids = _ids(3, 9)
    assert torch.equal(counter_uniform(5, ids, 4, 10), counter_uniform(5, ids, 4, 25)[:, :10])


def test_counter_uniform_independent_of_batch_composition():
    alone = counter_uniform(123, _ids(7), 4, 50)
    batch = counter_uniform(123, _ids(3, 7, 9), 4, 50)
    other = counter_uniform(123, _ids(7, 100, 200, 300), 4, 50)
    assert torch.equal(alone[0], batch[1])
    assert torch.equal(alone[0], other[0])
    # Also for the full sampling path.
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    tok_batch = sample_tokens(logits, 123, _ids(3, 7, 9), 4)
    tok_alone = sample_tokens(logits[1:2], 123, _ids(7), 4)
    assert tok_batch[1] == tok_alone[0]


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
