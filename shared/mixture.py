"""Data mixtures over several train datasets: MoDoMoDo's surrogate search and a mixture sampler.

MoDoMoDo (Liang et al. 2025, arXiv 2505.24871; METHODS.md C.6). Several datasets, each with its own
verifiable reward, are mixed with weights w on the simplex Δ^{K-1}. The recipe:

  1. `sample_pilot_weights`: pick N mixtures w_1..w_N (uniform, Dirichlet(1) draws, optionally the
     K one-dataset vertices) and run one pilot RL training per mixture (`MixtureSampler` draws the
     prompts); record each run's outcome s_n (held-out accuracy).
  2. `fit_quadratic`: least squares for the surrogate  s(w) = a + bᵀw + wᵀCw.
  3. `maximize_on_simplex`: w* = argmax_{w ∈ Δ} s(w) (dense simplex grid, then projected gradient
     ascent). Report the uniform mixture against w*; the paper gains +5.24% OOD average over uniform.

Identifiability. On the simplex Σ_k w_k = 1, so the features 1, w_k, w_i w_j are linearly dependent
(1 = Σ_k w_k and w_i = Σ_j w_i w_j): only K(K+1)/2 of the F = 1 + K + K(K+1)/2 coefficients are
determined by scores at simplex points. `fit_quadratic` returns the minimum-norm (a, b, C), whose
predictions on the simplex are unique; it needs only K(K+1)/2 pilot runs for points on the simplex
(F for general points), and at least as many that are not all on a lower-dimensional face.

Example (K = 3 datasets, 10 pilot runs):

    W = sample_pilot_weights(3, 10, seed=0)            # row 0 is uniform
    scores = [pilot_run(dict(zip(names, w))) for w in W]
    s = fit_quadratic(W, np.array(scores))
    w_star = maximize_on_simplex(s)                    # then train with MixtureSampler(rows' sources, w*)

Deviation from the paper: the paper does not fix the optimiser of the surrogate; here the best of a
grid and of projected gradient ascent (step ≤ 1/L, L = 2‖C‖₂, so it ascends monotonically when C ⪯ 0).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------------------------------
# The surrogate: features, fit, maximisation


def quadratic_features(w: np.ndarray) -> np.ndarray:
    """Features of s(w) = a + bᵀw + wᵀCw for each row of w [N, K] (or one w [K]) -> [N, F].

    Columns: 1, then w_1..w_K, then w_i w_j for i <= j in row-major order (i outer, j inner), so
    F = 1 + K + K(K+1)/2 (K=2: 6, K=3: 10, K=4: 15).
    """
    w = np.atleast_2d(np.asarray(w, dtype=np.float64))
    iu, ju = np.triu_indices(w.shape[1])
    return np.concatenate([np.ones((w.shape[0], 1)), w, w[:, iu] * w[:, ju]], axis=1)


def num_features(k: int) -> int:
    """F = 1 + K + K(K+1)/2, the number of columns of `quadratic_features` for K datasets."""
    return 1 + k + k * (k + 1) // 2


@dataclass
class QuadraticSurrogate:
    """s(w) = a + bᵀw + wᵀCw with C [K, K] symmetric (MoDoMoDo's score model)."""

    a: float
    b: np.ndarray  # [K]
    C: np.ndarray  # [K, K], symmetric

    def __call__(self, w: np.ndarray) -> float | np.ndarray:
        """Score of one mixture w [K] (a float) or of each row of w [N, K] (an array [N])."""
        w = np.asarray(w, dtype=np.float64)
        x = np.atleast_2d(w)
        out = self.a + x @ self.b + np.einsum("ni,ij,nj->n", x, self.C, x)
        return float(out[0]) if w.ndim == 1 else out

    def grad(self, w: np.ndarray) -> np.ndarray:
        """∇s(w) = b + 2Cw (C symmetric), for w [K] or [N, K]."""
        return self.b + 2.0 * np.asarray(w, dtype=np.float64) @ self.C


def fit_quadratic(weights: np.ndarray, scores: np.ndarray, ridge: float = 1e-6) -> QuadraticSurrogate:
    """Least-squares fit of s(w) = a + bᵀw + wᵀCw to pilot runs (weights [N, K], scores [N]).

    Solves min_θ ‖Xθ − s‖² + ridge·‖θ‖² (X = quadratic_features(weights), θ = (a, b, upper C)) with
    numpy lstsq on the stacked system [X; √ridge·I] θ = [s; 0]. The redundant features on the simplex
    need no ridge (with ridge = 0, lstsq returns the minimum-norm least-squares θ, whose predictions on
    the simplex are exact for exact data); the ridge only damps noisy fits from few or clustered
    pilot runs, and it shrinks the fit: with ridge = 1e-6, predictions move by ~1e-6 / σ²_min(X),
    e.g. 1e-4 for 20 Dirichlet points and K = 3. Pass ridge = 0 for an exact interpolating fit.
    """
    w = np.asarray(weights, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if w.ndim != 2:
        raise ValueError(f"fit_quadratic: weights must be [N, K], got shape {w.shape}")
    n, k = w.shape
    if s.shape[0] != n:
        raise ValueError(f"fit_quadratic: {n} weight rows but {s.shape[0]} scores")
    if not (np.isfinite(w).all() and np.isfinite(s).all()):
        raise ValueError("fit_quadratic: weights and scores must be finite (a pilot run without an outcome?)")
    if ridge < 0:
        raise ValueError(f"fit_quadratic: ridge must be >= 0, got {ridge}")
    f = num_features(k)
    on_simplex = bool(np.all(w >= -1e-9) and np.allclose(w.sum(1), 1.0, atol=1e-9))
    need = k * (k + 1) // 2 if on_simplex else f  # identifiable coefficients (module docstring)
    if n < need:
        raise ValueError(f"fit_quadratic: need at least {need} pilot runs for {k} datasets, got {n}")
    x = quadratic_features(w)
    rank = np.linalg.matrix_rank(x)
    if rank < need:
        raise ValueError(f"fit_quadratic: the {n} pilot mixtures determine only {rank} of {need} quadratic "
                         "coefficients (repeated mixtures, or all on one face of the simplex?); add varied mixtures")
    xs = np.concatenate([x, math.sqrt(ridge) * np.eye(f)]) if ridge > 0 else x
    ys = np.concatenate([s, np.zeros(f)]) if ridge > 0 else s
    theta = np.linalg.lstsq(xs, ys, rcond=None)[0]
    a, b, quad = float(theta[0]), theta[1 : 1 + k].copy(), theta[1 + k :]
    C = np.zeros((k, k))
    iu, ju = np.triu_indices(k)
    C[iu, ju] = quad
    C = 0.5 * (C + C.T)  # off-diagonal coefficient c_ij (i < j) of w_i w_j splits as C_ij = C_ji = c_ij / 2
    return QuadraticSurrogate(a, b, C)


def project_to_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of v [K] (or each row of v [N, K]) onto {w : w >= 0, Σ w = 1}.

    Sort-based algorithm (Duchi et al. 2008; Wang & Carreira-Perpiñán 2013, Alg. 1): with u = v sorted
    decreasingly, ρ = max{j : u_j + (1 − Σ_{i<=j} u_i) / j > 0}, τ = (Σ_{i<=ρ} u_i − 1) / ρ, and
    w = max(v − τ, 0).
    """
    v = np.asarray(v, dtype=np.float64)
    x = np.atleast_2d(v)
    u = -np.sort(-x, axis=1)
    css = np.cumsum(u, axis=1)
    j = np.arange(1, x.shape[1] + 1)
    rho = np.sum(u + (1.0 - css) / j > 0, axis=1)  # the condition holds exactly for j = 1..ρ
    tau = (css[np.arange(x.shape[0]), rho - 1] - 1.0) / rho
    w = np.maximum(x - tau[:, None], 0.0)
    return w[0] if v.ndim == 1 else w


def simplex_grid(k: int, grid: int) -> np.ndarray:
    """All w with w_k = n_k / grid, n_k >= 0 integers summing to `grid` (C(grid+K−1, K−1) rows) -> [M, K].

    Stars and bars: choosing K−1 bar positions among grid+K−1 slots gives one composition.
    """
    if k < 1 or grid < 1:
        raise ValueError(f"simplex_grid: need k >= 1 and grid >= 1, got k={k}, grid={grid}")
    bars = np.array(list(itertools.combinations(range(grid + k - 1), k - 1)), dtype=np.int64).reshape(-1, k - 1)
    edges = np.concatenate([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), grid + k - 1)], axis=1)
    return (np.diff(edges, axis=1) - 1) / grid


def maximize_on_simplex(surrogate: QuadraticSurrogate, steps: int = 2000, lr: float = 0.05, grid: int = 20,
                        seed: int = 0, restarts: int = 4, max_grid_points: int = 200_000) -> np.ndarray:
    """w* = argmax over the simplex of the surrogate: the best of a grid and of projected gradient ascent.

    (a) every point of `simplex_grid(K, grid)` (grid lowered until it has <= `max_grid_points` points,
    which only matters for K above ~6); (b) projected gradient ascent w <- Π_Δ(w + η ∇s(w)) for `steps`
    steps with η = min(lr, 1/L), L = 2‖C‖₂ (the gradient's Lipschitz constant), started from the best
    grid point and from `restarts` Dirichlet(1) points drawn with `seed`. For concave s (C ⪯ 0) this
    converges to the global maximiser; otherwise it is the best local one found. Returns w* [K]
    (non-negative, sums to 1).
    """
    k = surrogate.b.shape[0]
    while grid > 1 and math.comb(grid + k - 1, k - 1) > max_grid_points:
        grid -= 1
    pts = simplex_grid(k, grid)
    vals = surrogate(pts)
    best_w, best_v = pts[int(np.argmax(vals))], float(np.max(vals))
    lipschitz = 2.0 * float(np.linalg.norm(surrogate.C, 2))
    eta = min(lr, 1.0 / lipschitz) if lipschitz > 0 else lr
    starts = np.concatenate([best_w[None], np.random.default_rng(seed).dirichlet(np.ones(k), size=restarts)])
    w = starts
    for _ in range(steps):  # all starts ascend together, one row each
        w = project_to_simplex(w + eta * surrogate.grad(w))
    vals = surrogate(w)
    if float(np.max(vals)) > best_v:
        best_w = w[int(np.argmax(vals))]
    best_w = np.maximum(best_w, 0.0)
    return best_w / best_w.sum()


def sample_pilot_weights(k: int, n: int, seed: int, include_uniform: bool = True,
                         include_vertices: bool = False) -> np.ndarray:
    """n pilot mixtures [n, K]: the uniform mixture first (if asked), then the K one-hot vertices (if
    asked), then Dirichlet(1) draws (uniform on the simplex) from numpy's Generator seeded with `seed`.

    n counts all rows (one per pilot run); the Dirichlet draws fill what the fixed rows leave.
    """
    fixed = ([np.full((1, k), 1.0 / k)] if include_uniform else []) + ([np.eye(k)] if include_vertices else [])
    n_fixed = sum(len(f) for f in fixed)
    if k < 1 or n < n_fixed:
        raise ValueError(f"sample_pilot_weights: need k >= 1 and n >= {n_fixed} (the uniform/vertex rows), "
                         f"got k={k}, n={n}")
    draws = np.random.default_rng(seed).dirichlet(np.ones(k), size=n - n_fixed)
    return np.concatenate(fixed + [draws]) if fixed else draws


# ---------------------------------------------------------------------------------------------------
# The sampler


class MixtureSampler:
    """Each batch position comes from dataset d with probability w_d (weights normalised by their sum),
    then a row of d uniformly without replacement within d's epoch (d's permutation is redrawn when
    it runs out; each dataset counts its own epochs).

    Follows the sampler contract of shared/sampler.py. Like the samplers there it keeps no hidden
    RNG state: the datasets of a batch come from a numpy Generator seeded by (seed, cursor) and the
    permutation of dataset d's epoch e from one seeded by (seed, d, e), so `state_dict()` (the cursor,
    each dataset's draw count and the last batch's counts) determines every later batch exactly.

    sources: each train row's dataset name (row i belongs to sources[i]).
    weights: {dataset name: w >= 0}. Datasets not named get weight 0 (never drawn).
    datasets: the declared dataset names, when known (e.g. from the task config); default: the names in
        `sources`. A declared dataset may have no rows only if its weight is 0.
    metrics(): {"mixture/frac_<name>": share of the last batch from each dataset} ({} before any batch).
    """

    _BATCH_TAG, _PERM_TAG = 0x6D69785F62, 0x6D69785F70  # separate the two seed streams

    def __init__(self, sources: list[str], weights: dict[str, float], batch_size: int, seed: int = 0,
                 datasets: list[str] | None = None):
        if not sources:
            raise ValueError("sampler: the train split is empty")
        if batch_size <= 0:
            raise ValueError(f"sampler: batch_size must be > 0, got {batch_size}")
        sources = [str(s) for s in sources]
        self.datasets = sorted({str(d) for d in datasets} if datasets is not None else set(sources))
        stray = next((i for i, s in enumerate(sources) if s not in self.datasets), None)
        if stray is not None:
            raise ValueError(f"sampler: train row {stray} is from dataset {sources[stray]!r}, "
                             f"not one of the declared {self.datasets}")
        self.pools = {d: [i for i, s in enumerate(sources) if s == d] for d in self.datasets}
        self.probs = _mixture_probs(self.datasets, self.pools, weights)
        self.batch_size, self.seed = batch_size, seed % 2**64
        self.cursor = 0  # rows handed out so far (global draw position)
        self.taken = {d: 0 for d in self.datasets}  # rows drawn from each dataset so far
        self.last_counts = {d: 0 for d in self.datasets}  # rows of the last batch from each dataset
        self._perm_cache: dict[str, tuple[int, np.ndarray]] = {}  # dataset -> (epoch, permutation); derived

    def _perm(self, d: str, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(d)
        if cached is None or cached[0] != epoch:
            ss = np.random.SeedSequence([self.seed, self._PERM_TAG, self.datasets.index(d), epoch])
            cached = (epoch, np.random.default_rng(ss).permutation(len(self.pools[d])))
            self._perm_cache[d] = cached
        return cached[1]

    def next_batch(self, n: int | None = None) -> list[int]:
        n = self.batch_size if n is None else n
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._BATCH_TAG, self.cursor]))
        picks = rng.choice(len(self.datasets), size=n, p=self.probs)
        out = []
        self.last_counts = {d: 0 for d in self.datasets}
        for j in picks.tolist():
            d = self.datasets[j]
            epoch, pos = divmod(self.taken[d], len(self.pools[d]))
            out.append(self.pools[d][int(self._perm(d, epoch)[pos])])
            self.taken[d] += 1
            self.last_counts[d] += 1
        self.cursor += n
        return out

    def update(self, group_ids, stats) -> None:
        """A fixed mixture ignores feedback."""

    def metrics(self) -> dict[str, float]:
        n = sum(self.last_counts.values())
        return {f"mixture/frac_{d}": c / n for d, c in self.last_counts.items()} if n else {}

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "taken": dict(self.taken), "last_counts": dict(self.last_counts),
                "datasets": list(self.datasets)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["datasets"]) != self.datasets:
            raise ValueError(f"sampler: checkpoint mixes datasets {state['datasets']}, this run has {self.datasets}")
        self.cursor = int(state["cursor"])
        self.taken = {d: int(v) for d, v in state["taken"].items()}
        self.last_counts = {d: int(v) for d, v in state["last_counts"].items()}


def _mixture_probs(datasets: list[str], pools: dict[str, list[int]], weights: dict[str, float]) -> np.ndarray:
    unknown = sorted(set(map(str, weights)) - set(datasets))
    if unknown:
        raise ValueError(f"sampler.weights: unknown dataset(s) {unknown}; the datasets are {datasets}")
    w = {str(name): float(v) for name, v in weights.items()}
    bad = [n for n, v in w.items() if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"sampler.weights: weights must be finite and >= 0, got {bad[0]}={w[bad[0]]}")
    total = sum(w.values())
    if total <= 0:
        raise ValueError("sampler.weights: all weights are 0; give at least one dataset a positive weight")
    empty = [n for n, v in w.items() if v > 0 and not pools[n]]
    if empty:
        raise ValueError(f"sampler.weights: dataset {empty[0]!r} has weight {w[empty[0]]} but no train rows")
    return np.array([w.get(d, 0.0) / total for d in datasets])


def mixture_sampler_from_rows(rows: list[dict], field: str, weights: dict[str, float], batch_size: int,
                              seed: int) -> MixtureSampler:
    """A `MixtureSampler` whose datasets are each train row's `field` (what `build_sampler` would call)."""
    missing = [i for i, r in enumerate(rows) if field not in r]
    if missing:
        raise ValueError(f"sampler.source_field: train row {missing[0]} has no field {field!r}")
    return MixtureSampler([str(r[field]) for r in rows], weights, batch_size, seed)


# --------------------------------------------------------------------------------------------
# `rlft mixture CONFIG`: the whole MoDoMoDo search with real RL runs
# --------------------------------------------------------------------------------------------


def mixture_search(load, datasets: list[str], n_pilots: int, seed: int, train, out) -> dict:
    """Pilot RL runs at sampled mixture weights (the uniform one first), a quadratic surrogate of their
    held-out metric, its maximiser w* on the simplex, and one more run at w* with the same budget.

    `load(name, weights) -> RunConfig` makes a run's config; `train(cfg) -> summary` runs it. Writes
    out/mixture.json and out/mixture.md; returns the record.
    """
    from pathlib import Path

    k = len(datasets)
    need = k * (k + 1) // 2
    if k < 2 or n_pilots < need:
        raise ValueError(f"rlft mixture: {k} datasets need at least {need} pilot runs (pilots={n_pilots}); "
                         "name two or more datasets in sampler.weights")
    weights = sample_pilot_weights(k, n_pilots, seed)
    pilots = []
    for i, w in enumerate(weights):
        summary = train(load(f"pilot{i}", dict(zip(datasets, map(float, w)))))
        pilots.append({"weights": [float(x) for x in w], "score": float(summary["after"]), "run_dir": summary["run_dir"],
                       "metric": summary["metric"]})
    higher = summary.get("higher_is_better", True)
    sign = 1.0 if higher else -1.0
    surrogate = fit_quadratic(weights, sign * np.array([p["score"] for p in pilots]))
    best_w = maximize_on_simplex(surrogate, seed=seed)
    best = train(load("best", dict(zip(datasets, map(float, best_w)))))
    record = {"datasets": datasets, "metric": pilots[0]["metric"], "pilots": pilots,
              "uniform": pilots[0], "predicted_best": {"weights": [float(x) for x in best_w],
                                                       "predicted_score": sign * float(surrogate(best_w)),
                                                       "score": float(best["after"]), "run_dir": best["run_dir"]}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixture.json").write_text(__import__("json").dumps(record, indent=2))
    fmt = lambda w: ", ".join(f"{d} {x:.2f}" for d, x in zip(datasets, w))  # noqa: E731
    lines = ["# Mixture search (MoDoMoDo; generated by `rlft mixture`)", "",
             f"| run | weights | held-out {record['metric']} |", "|---|---|---|"]
    lines += [f"| pilot {i}{' (uniform)' if i == 0 else ''} | {fmt(p['weights'])} | {p['score']:.3f} |" for i, p in enumerate(pilots)]
    pb = record["predicted_best"]
    lines += [f"| predicted best (surrogate {pb['predicted_score']:.3f}) | {fmt(pb['weights'])} | {pb['score']:.3f} |", "",
              f"Uniform {pilots[0]['score']:.3f} vs predicted best {pb['score']:.3f} "
              f"({pb['score'] - pilots[0]['score']:+.3f})."]
    (out / "mixture.md").write_text("\n".join(lines) + "\n")
    return record
