"""Per-token KL estimators k1/k2/k3 (shared/kl.py, METHODS.md A "KL to the reference")."""

from __future__ import annotations

import math

import pytest
import torch

from shared.kl import kl_penalty


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_hand_values_policy_above_reference():
    # logp = -1, ref = -2:  log r = ref - logp = -1
    #   k1 = -log r                   = 1
    #   k2 = (log r)^2 / 2            = 0.5
    #   k3 = e^{log r} - log r - 1    = e^-1 + 1 - 1 = e^-1 ~ 0.367879
    logp, ref = _t([-1.0]), _t([-2.0])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(1.0, abs=1e-15)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5, abs=1e-15)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-1.0), abs=1e-15)


def test_hand_values_policy_below_reference():
    # logp = -2, ref = -1:  log r = +1
    #   k1 = -1 (k1 can be negative)
    #   k2 = 0.5
    #   k3 = e - 1 - 1 = e - 2 ~ 0.718282
    logp, ref = _t([-2.0]), _t([-1.0])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(-1.0, abs=1e-15)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5, abs=1e-15)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.e - 2.0, abs=1e-15)


def test_default_estimator_is_k3_and_shape_preserved():
    logp = _t([[-1.0, -2.0, -0.5], [-3.0, -3.0, -0.1]])
    ref = _t([[-2.0, -1.0, -0.5], [-1.0, -3.0, -0.2]])
    out = kl_penalty(logp, ref)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, kl_penalty(logp, ref, "k3"))
    # equal log-probs -> every estimator is exactly 0
    for est in ("k1", "k2", "k3"):
        assert torch.equal(kl_penalty(logp, logp.clone(), est), torch.zeros_like(logp))


def test_k3_nonnegative_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(64, 50, generator=gen, dtype=torch.float64) * 12
    ref = -torch.rand(64, 50, generator=gen, dtype=torch.float64) * 12
    k3 = kl_penalty(logp, ref, "k3")
    assert (k3 >= 0).all()
    # k2 >= 0 too; k1 takes both signs on these inputs
    assert (kl_penalty(logp, ref, "k2") >= 0).all()
    k1 = kl_penalty(logp, ref, "k1")
    assert (k1 < 0).any() and (k1 > 0).any()
    # loop reference (log r clamped to [-10, 10]; some inputs reach |log r| > 10)
    assert ((ref - logp).abs() > 10).any()
    for i in range(64):
        for t in range(0, 50, 3):
            lr = min(max(ref[i, t].item() - logp[i, t].item(), -10.0), 10.0)
            assert k3[i, t].item() == pytest.approx(math.exp(lr) - lr - 1.0, rel=1e-12, abs=1e-14)


def test_k3_is_unbiased_estimator_of_kl():
    # E_{y ~ pi_theta}[k3] = KL(pi_theta || pi_ref); exact expectation over a small categorical
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    kl_exact = (p * (p.log() - q.log())).sum()
    for est in ("k1", "k3"):
        expect = (p * kl_penalty(p.log(), q.log(), est)).sum()
        torch.testing.assert_close(expect, kl_exact)


def test_clamp_default_10():
    # logp = 0, ref = -50: log r = -50, clamped to -10
    #   k1 = 10,  k2 = 100/2 = 50,  k3 = e^-10 + 10 - 1 = 9.0000454
    logp, ref = _t([0.0]), _t([-50.0])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(10.0)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(50.0)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-10.0) + 9.0, rel=1e-14)
    # upper side: log r = +50 -> +10:  k3 = e^10 - 10 - 1, finite (no e^50)
    assert kl_penalty(ref, logp, "k3").item() == pytest.approx(math.exp(10.0) - 11.0, rel=1e-14)
    assert kl_penalty(ref, logp, "k1").item() == pytest.approx(-10.0)


def test_custom_clamp_and_zero_gradient_beyond_it():
    # clamp = 2: log r = ref - logp = -3 -> -2:  k3 = e^-2 + 2 - 1 = e^-2 + 1
    logp = _t([1.0, 0.5]).requires_grad_(True)
    ref = _t([-2.0, 0.0])
    k3 = kl_penalty(logp, ref, "k3", clamp=2.0)
    # second token: log r = -0.5 (inside):  k3 = e^-0.5 + 0.5 - 1
    torch.testing.assert_close(k3, _t([math.exp(-2.0) + 1.0, math.exp(-0.5) - 0.5]))
    k3.sum().backward()
    # d k3 / d logp = -(e^{log r} - 1) = 1 - e^{log r} inside the clamp, 0 outside
    torch.testing.assert_close(logp.grad, _t([0.0, 1.0 - math.exp(-0.5)]))


def test_unknown_estimator_raises():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(_t([0.0]), _t([0.0]), "k4")
