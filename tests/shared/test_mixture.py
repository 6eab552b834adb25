"""MoDoMoDo mixtures: surrogate features/fit/maximisation against hand values and brute force; the
mixture sampler's fractions, per-dataset epochs and exact resume."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from shared.mixture import (
    MixtureSampler,
    QuadraticSurrogate,
    fit_quadratic,
    maximize_on_simplex,
    mixture_sampler_from_rows,
    num_features,
    project_to_simplex,
    quadratic_features,
    sample_pilot_weights,
    simplex_grid,
)


def _known_quadratic(seed: int = 0) -> QuadraticSurrogate:
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(3, 3))
    return QuadraticSurrogate(0.3, np.array([0.2, -0.1, 0.5]), (m + m.T) / 2)


# --- features and the surrogate ---------------------------------------------------------------------

def test_quadratic_features_by_hand_and_against_loop():
    # w = (0.2, 0.3, 0.5): 1 | w1 w2 w3 | w1², w1w2, w1w3, w2², w2w3, w3²
    f = quadratic_features(np.array([0.2, 0.3, 0.5]))
    assert f.shape == (1, 10) == (1, num_features(3))
    np.testing.assert_allclose(f[0], [1, 0.2, 0.3, 0.5, 0.04, 0.06, 0.10, 0.09, 0.15, 0.25])
    w = np.random.default_rng(1).random((7, 4))
    loop = [[1.0, *row, *[row[i] * row[j] for i in range(4) for j in range(i, 4)]] for row in w]
    np.testing.assert_allclose(quadratic_features(w), np.array(loop))
    assert [num_features(k) for k in (2, 3, 4)] == [6, 10, 15]


def test_surrogate_call_and_grad():
    s = QuadraticSurrogate(1.0, np.array([2.0, -1.0]), np.array([[-1.0, 0.5], [0.5, 3.0]]))
    # w = (0.25, 0.75): 1 + (0.5 - 0.75) + (-0.0625 + 2·0.5·0.1875 + 3·0.5625) = 0.75 + 1.8125 = 2.5625
    assert s(np.array([0.25, 0.75])) == pytest.approx(2.5625)
    w = np.random.default_rng(2).random((5, 2))
    np.testing.assert_allclose(s(w), [s(row) for row in w])
    eps = 1e-6  # central differences of a quadratic are exact up to rounding
    fd = [(s(w[0] + eps * e) - s(w[0] - eps * e)) / (2 * eps) for e in np.eye(2)]
    np.testing.assert_allclose(s.grad(w[0]), fd, atol=1e-7)


# --- the fit ------------------------------------------------------------------------------------------

def test_fit_recovers_known_quadratic_on_the_simplex():
    true = _known_quadratic()
    rng = np.random.default_rng(3)
    w, w_new = rng.dirichlet(np.ones(3), 20), rng.dirichlet(np.ones(3), 50)
    exact = fit_quadratic(w, true(w), ridge=0.0)
    np.testing.assert_allclose(exact(w_new), true(w_new), atol=1e-8)
    assert np.allclose(exact.C, exact.C.T)
    default = fit_quadratic(w, true(w))  # ridge 1e-6 shrinks a little (see the docstring)
    np.testing.assert_allclose(default(w_new), true(w_new), atol=1e-3)


def test_fit_recovers_coefficients_off_the_simplex():
    # away from the simplex the features are independent, so a, b, C themselves are recovered
    true = _known_quadratic()
    w = np.random.default_rng(4).normal(size=(15, 3))
    fit = fit_quadratic(w, true(w), ridge=0.0)
    assert fit.a == pytest.approx(true.a, abs=1e-10)
    np.testing.assert_allclose(fit.b, true.b, atol=1e-10)
    np.testing.assert_allclose(fit.C, true.C, atol=1e-10)


def test_fit_errors():
    w = np.random.default_rng(5).dirichlet(np.ones(3), 5)
    with pytest.raises(ValueError, match="need at least 6 pilot runs for 3 datasets, got 5"):
        fit_quadratic(w, np.zeros(5))  # on the simplex only K(K+1)/2 = 6 coefficients are identifiable
    with pytest.raises(ValueError, match="need at least 10 pilot runs for 3 datasets, got 8"):
        fit_quadratic(np.random.default_rng(5).normal(size=(8, 3)), np.zeros(8))
    edge = np.stack([np.linspace(0, 1, 10), 1 - np.linspace(0, 1, 10), np.zeros(10)], axis=1)
    with pytest.raises(ValueError, match="determine only"):
        fit_quadratic(edge, np.zeros(10))  # all on one edge: w3's terms are unknown
    with pytest.raises(ValueError, match="3 scores"):
        fit_quadratic(np.random.default_rng(5).dirichlet(np.ones(2), 4), np.zeros(3))


# --- projection, grid, maximisation -------------------------------------------------------------------

def test_project_to_simplex_by_hand():
    np.testing.assert_allclose(project_to_simplex(np.array([0.5, 0.5])), [0.5, 0.5])
    np.testing.assert_allclose(project_to_simplex(np.array([2.0, 0.0])), [1.0, 0.0])
    np.testing.assert_allclose(project_to_simplex(np.array([1.0, 1.0, 1.0])), [1 / 3, 1 / 3, 1 / 3])
    # sorted (0.9, 0.3, -1): ρ = 2 (0.3 + (1 - 1.2)/2 = 0.2 > 0; -1 + (1 - 0.2)/3 < 0), τ = (1.2 - 1)/2 = 0.1
    np.testing.assert_allclose(project_to_simplex(np.array([0.3, -1.0, 0.9])), [0.2, 0.0, 0.8])


def test_project_to_simplex_against_brute_force():
    rng = np.random.default_rng(6)
    for k in (2, 3, 4):
        candidates = rng.dirichlet(np.ones(k), 1000)
        for _ in range(20):
            v = rng.normal(scale=2.0, size=k)
            p = project_to_simplex(v)
            assert p.min() >= 0 and p.sum() == pytest.approx(1.0)
            assert np.linalg.norm(p - v) <= np.linalg.norm(candidates - v, axis=1).min() + 1e-12
    vs = rng.normal(size=(9, 4))
    np.testing.assert_allclose(project_to_simplex(vs), [project_to_simplex(v) for v in vs])


def test_simplex_grid():
    g = simplex_grid(3, 4)
    assert len(g) == 15  # C(4 + 2, 2)
    np.testing.assert_allclose(g.sum(1), 1.0)
    assert len({tuple(r) for r in (g * 4).round().astype(int)}) == 15
    brute = {c for c in itertools.product(range(5), repeat=3) if sum(c) == 4}
    assert {tuple(r) for r in (g * 4).round().astype(int)} == brute


def _neg_sq_dist(w_true) -> QuadraticSurrogate:
    # -‖w − t‖² = −‖t‖² + 2tᵀw − wᵀIw
    t = np.asarray(w_true, dtype=float)
    return QuadraticSurrogate(-float(t @ t), 2 * t, -np.eye(len(t)))


def test_maximize_interior_optimum():
    s = _neg_sq_dist([0.5, 0.3, 0.2])
    np.testing.assert_allclose(maximize_on_simplex(s), [0.5, 0.3, 0.2], atol=1e-3)
    w = maximize_on_simplex(s, grid=7)  # (0.5, 0.3, 0.2) is not on this grid: the ascent must find it
    np.testing.assert_allclose(w, [0.5, 0.3, 0.2], atol=1e-3)


def test_maximize_edge_optimum_against_fine_grid():
    t = np.array([0.7, 0.6, -0.3])  # outside the simplex: the maximiser is its projection, on an edge
    s = _neg_sq_dist(t)
    w = maximize_on_simplex(s, grid=7)
    fine = simplex_grid(3, 200)
    brute = fine[np.argmax(s(fine))]
    np.testing.assert_allclose(w, brute, atol=1e-2)
    np.testing.assert_allclose(w, project_to_simplex(t), atol=1e-6)  # = (0.55, 0.45, 0)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)


def test_maximize_non_concave_picks_best_vertex():
    # convex s(w) = ‖w‖² + 0.1 w₂: maxima at vertices, the best is e₂
    s = QuadraticSurrogate(0.0, np.array([0.0, 0.1, 0.0]), np.eye(3))
    np.testing.assert_allclose(maximize_on_simplex(s), [0.0, 1.0, 0.0], atol=1e-9)


def test_picks_better_than_uniform_mixture_on_two_task_synthetic():
    def true_score(w):  # maximal at w1 = 0.375 (0.65625) vs uniform 0.65
        return 0.6 + 0.3 * w[..., 0] - 0.4 * w[..., 0] ** 2

    uniform = true_score(np.array([0.5, 0.5]))
    for seed in range(5):
        w = sample_pilot_weights(2, 8, seed=seed)
        noisy = true_score(w) + np.random.default_rng(100 + seed).normal(scale=0.003, size=8)
        w_star = maximize_on_simplex(fit_quadratic(w, noisy))
        assert true_score(w_star) > uniform, (seed, w_star)


def test_sample_pilot_weights():
    w = sample_pilot_weights(3, 10, seed=0, include_vertices=True)
    assert w.shape == (10, 3)
    np.testing.assert_allclose(w[0], [1 / 3] * 3)
    np.testing.assert_allclose(w[1:4], np.eye(3))
    assert w.min() >= 0
    np.testing.assert_allclose(w.sum(1), 1.0)
    np.testing.assert_array_equal(w, sample_pilot_weights(3, 10, seed=0, include_vertices=True))
    assert not np.allclose(sample_pilot_weights(3, 5, seed=0, include_uniform=False)[0], 1 / 3)
    with pytest.raises(ValueError, match="n >= 4"):
        sample_pilot_weights(3, 3, seed=0, include_vertices=True)


# --- the sampler ----------------------------------------------------------------------------------------

SOURCES = ["math"] * 30 + ["code"] * 20 + ["chart"] * 10  # rows 0-29 math, 30-49 code, 50-59 chart


def _dataset(i: int) -> str:
    return SOURCES[i]


def test_mixture_fractions_match_weights():
    s = MixtureSampler(SOURCES, {"math": 0.7, "code": 0.3}, batch_size=16, seed=0)
    drawn = [i for _ in range(200) for i in s.next_batch()]
    assert s.cursor == 3200
    frac = Counter(_dataset(i) for i in drawn)
    assert abs(frac["math"] / 3200 - 0.7) < 0.05 and abs(frac["code"] / 3200 - 0.3) < 0.05
    assert frac["chart"] == 0  # weight not given: never drawn
    m = s.metrics()
    assert set(m) == {"mixture/frac_math", "mixture/frac_code", "mixture/frac_chart"}
    assert sum(m.values()) == pytest.approx(1.0) and m["mixture/frac_chart"] == 0.0


def test_mixture_without_replacement_per_dataset_epoch():
    s = MixtureSampler(SOURCES, {"math": 1.0, "code": 1.0, "chart": 2.0}, batch_size=7, seed=3)
    drawn = [i for _ in range(60) for i in s.next_batch()]
    for name, size in (("math", 30), ("code", 20), ("chart", 10)):
        seq = [i for i in drawn if _dataset(i) == name]
        assert len(seq) >= 2 * size
        assert sorted(seq[:size]) == [i for i, d in enumerate(SOURCES) if d == name]  # epoch 1: each row once
        assert sorted(seq[size : 2 * size]) == sorted(seq[:size])  # epoch 2 too
        assert seq[size : 2 * size] != seq[:size]  # reshuffled


def test_mixture_state_dict_round_trip():
    s = MixtureSampler(SOURCES, {"math": 0.5, "code": 0.3, "chart": 0.2}, batch_size=5, seed=11)
    for _ in range(13):  # crosses dataset epochs
        s.next_batch()
    state = s.state_dict()
    expected = [s.next_batch() for _ in range(5)]
    expected_metrics = s.metrics()
    r = MixtureSampler(SOURCES, {"math": 0.5, "code": 0.3, "chart": 0.2}, batch_size=5, seed=11)
    r.load_state_dict(state)
    assert r.cursor == state["cursor"] == 65
    assert [r.next_batch() for _ in range(5)] == expected
    assert r.metrics() == expected_metrics
    other = MixtureSampler(SOURCES, {"math": 0.5, "code": 0.3, "chart": 0.2}, batch_size=5, seed=12)
    assert [other.next_batch() for _ in range(3)] != [MixtureSampler(
        SOURCES, {"math": 0.5, "code": 0.3, "chart": 0.2}, batch_size=5, seed=11).next_batch() for _ in range(3)]


def test_mixture_zero_weight_never_drawn():
    s = MixtureSampler(SOURCES, {"math": 0.0, "code": 1.0, "chart": 0.5}, batch_size=16, seed=0)
    assert not any(_dataset(i) == "math" for _ in range(50) for i in s.next_batch())


@pytest.mark.parametrize("weights, match", [
    ({"math": 1.0, "maths": 1.0}, "unknown dataset"),
    ({"math": -0.1, "code": 1.0}, ">= 0"),
    ({"math": float("nan")}, ">= 0"),
    ({"math": 0.0, "code": 0.0}, "all weights are 0"),
    ({}, "all weights are 0"),
])
def test_mixture_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        MixtureSampler(SOURCES, weights, batch_size=4)


def test_mixture_declared_dataset_without_rows():
    declared = ["math", "code", "chart", "geometry"]
    MixtureSampler(SOURCES, {"math": 1.0, "geometry": 0.0}, batch_size=4, datasets=declared)  # fine at weight 0
    with pytest.raises(ValueError, match="'geometry' has weight 0.5 but no train rows"):
        MixtureSampler(SOURCES, {"math": 1.0, "geometry": 0.5}, batch_size=4, datasets=declared)
    with pytest.raises(ValueError, match="not one of the declared"):
        MixtureSampler(SOURCES, {"math": 1.0}, batch_size=4, datasets=["math", "code"])


def test_mixture_from_rows():
    rows = [{"prompt": "p", "source": d} for d in SOURCES]
    s = mixture_sampler_from_rows(rows, "source", {"code": 1.0}, batch_size=4, seed=0)
    assert all(_dataset(i) == "code" for i in s.next_batch())
    with pytest.raises(ValueError, match="train row 0 has no field 'dataset'"):
        mixture_sampler_from_rows(rows, "dataset", {"code": 1.0}, batch_size=4, seed=0)


def test_config_builds_the_mixture_sampler():
    from shared.config import SamplerConfig
    from shared.sampler import build_sampler

    rows = [{"source": "a"}] * 30 + [{"source": "b"}] * 10
    sampler = build_sampler(SamplerConfig(name="mixture", weights={"a": 0.0, "b": 1.0}), rows, 8, seed=0)
    assert all(i >= 30 for _ in range(5) for i in sampler.next_batch())  # only dataset b is drawn
    with pytest.raises(ValueError, match="source"):
        build_sampler(SamplerConfig(name="mixture", weights={"a": 1.0}), [{"x": 1}], 4, seed=0)
