"""Weight-space comparison of two checkpoints W0 (start) and W1 (after fine-tuning), per 2-D matrix.

"The Path Not Taken: RLVR Provably Learns Off the Principals" (arXiv 2511.08567), METHODS.md B.20.
[APPROX] no code was published and the exact formulas were not retrieved; these are the
best-supported reconstructions from the abstract. The paper's claim: RLVR gives small drift, small
rotation and off-principal updates; SFT gives the opposite.

| metric              | formula (σ: singular values, descending; U_k, V_k: top-k singular vectors)    |
|---------------------|-------------------------------------------------------------------------------|
| `spectral_drift`    | ‖σ(W1) − σ(W0)‖₂ / ‖σ(W0)‖₂ (all values, or the top k)                        |
| `principal_angles`  | cos θ_i = svals(U_k(W0)ᵀ U_k(W1)), same for V; mean / max θ, ‖sin Θ‖_F         |
| `update_alignment`  | overlap |M_u ∩ M_p| / |M_u| vs chance α; energy ‖P_k(ΔW)‖_F² / ‖ΔW‖_F²        |

with ΔW = W1 − W0, M_p = `principal_mask(W0, k, α)` (LIFT-style, arXiv 2505.24075), M_u the entries
that changed by more than bf16 resolution, and P_k(ΔW) = U_k U_kᵀ ΔW V_k V_kᵀ (W0's subspaces).

All computations run in float64 on CPU. Top-k subspaces are ill-defined when σ_k = σ_{k+1}; the
angles then depend on which basis the SVD returns.

Run on two checkpoints::

    from shared.analysis.weights import compare_state_dicts
    report = compare_state_dicts(torch.load("base.pt"), torch.load("rl.pt"), k=16, frac=0.05)
    print(report["summary"])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BF16_REL_RESOLUTION = 2.0**-8
"""Relative half-spacing of bf16 (8 significand bits): changes below 2**-8 · |w| may be rounding."""


def _as_matrix(w: Tensor, name: str = "w") -> Tensor:
    if w.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(w.shape)}")
    return w.detach().to(device="cpu", dtype=torch.float64)


def _pair(w0: Tensor, w1: Tensor) -> tuple[Tensor, Tensor]:
    a, b = _as_matrix(w0, "w0"), _as_matrix(w1, "w1")
    if a.shape != b.shape:
        raise ValueError(f"w0 and w1 must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def _check_rank(k: int, w: Tensor) -> None:
    if not 1 <= k <= min(w.shape):
        raise ValueError(f"k must be in [1, {min(w.shape)}] for a {tuple(w.shape)} matrix, got {k}")


def low_rank_approximation(w: Tensor, k: int) -> Tensor:
    """W_k = U_k Σ_k V_kᵀ, the best rank-k approximation of a 2-D `w` (Eckart–Young), in w's dtype."""
    if w.dim() != 2:
        raise ValueError(f"w must be a 2-D matrix, got shape {tuple(w.shape)}")
    _check_rank(k, w)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def top_entries_mask(scores: Tensor, n: int) -> Tensor:
    """Boolean mask of the `n` largest entries of `scores`, ties broken by torch.topk on the flat tensor."""
    if not 1 <= n <= scores.numel():
        raise ValueError(f"n must be in [1, {scores.numel()}], got {n}")
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores.flatten(), n).indices] = True
    return mask.view(scores.shape)


def spectral_drift(w0: Tensor, w1: Tensor, k: int | None = None) -> float:
    """Δσ = ‖σ(W1) − σ(W0)‖₂ / ‖σ(W0)‖₂ over all singular values, or the top-k when k is given.

    Paper 2511.08567 (METHODS.md B.20) [APPROX]. Singular values are sorted descending, so the i-th
    value of W0 is compared with the i-th of W1. W0 with all singular values zero is an error.
    """
    a, b = _pair(w0, w1)
    s0, s1 = torch.linalg.svdvals(a), torch.linalg.svdvals(b)
    if k is not None:
        _check_rank(k, a)
        s0, s1 = s0[:k], s1[:k]
    denom = torch.linalg.vector_norm(s0)
    if denom == 0:
        raise ValueError("spectral_drift: W0 is zero (all singular values 0), the relative drift is undefined")
    return float(torch.linalg.vector_norm(s1 - s0) / denom)


def _subspace_angles(q0: Tensor, q1: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between span(q0) and span(q1), both orthonormal [m, k].

    cos θ_i = svals(q0ᵀ q1) (descending) and sin θ_i = svals((I − q0 q0ᵀ) q1) (ascending);
    θ = atan2(sin, cos) is accurate at both ends, where acos alone loses half the digits near 0.
    """
    cos = torch.linalg.svdvals(q0.T @ q1).clamp(0.0, 1.0)
    sin = torch.linalg.svdvals(q1 - q0 @ (q0.T @ q1)).clamp(0.0, 1.0).flip(0)
    return torch.atan2(sin, cos)


def principal_angles(w0: Tensor, w1: Tensor, k: int) -> dict[str, float]:
    """Principal angles between the top-k left (U) and right (V) singular subspaces of W0 and W1.

    Paper 2511.08567 (METHODS.md B.20) [APPROX]: cos θ_i = svals(U_k(W0)ᵀ U_k(W1)) clamped to
    [0, 1], i = 1..k, and the same for V. Returns the mean and max angle in degrees and
    ‖sin Θ‖_F = sqrt(Σ_i sin² θ_i) for each side.
    """
    a, b = _pair(w0, w1)
    _check_rank(k, a)
    u0, _, vh0 = torch.linalg.svd(a, full_matrices=False)
    u1, _, vh1 = torch.linalg.svd(b, full_matrices=False)
    out: dict[str, float] = {}
    for side, q0, q1 in (("left", u0[:, :k], u1[:, :k]), ("right", vh0[:k].T, vh1[:k].T)):
        theta = _subspace_angles(q0, q1)
        deg = torch.rad2deg(theta)
        out[f"{side}_mean_deg"] = float(deg.mean())
        out[f"{side}_max_deg"] = float(deg.max())
        out[f"{side}_sin_fro"] = float(torch.linalg.vector_norm(torch.sin(theta)))
    return {key: out[key] for key in sorted(out)}


def principal_mask(w: Tensor, k: int, frac: float) -> Tensor:
    """LIFT-style principal mask M_p: the top-`frac` fraction of the entries of |W_k|.

    W_k = U_k Σ_k V_kᵀ (rank-k approximation, computed in float64); the mask holds
    n = max(1, round(frac · numel)) entries (Python's round), chosen by torch.topk on the flattened
    |W_k|, which also breaks ties. LIFT (arXiv 2505.24075, METHODS.md B.19) fixes n = (m + n)·r
    instead; see `shared.analysis.lift.lift_masks`. Returns a bool tensor on w's device.
    """
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    wk = low_rank_approximation(_as_matrix(w), k)
    n = max(1, round(frac * wk.numel()))
    return top_entries_mask(wk.abs(), n).to(w.device)


def update_alignment(w0: Tensor, w1: Tensor, k: int, frac: float, threshold: float | None = None) -> dict[str, float]:
    """Does the update ΔW = W1 − W0 land on W0's principal entries and subspaces?

    Paper 2511.08567 (METHODS.md B.20) [APPROX]:
      M_u = {|ΔW| > τ}, M_p = principal_mask(W0, k, frac)
      overlap = |M_u ∩ M_p| / |M_u| (0 if M_u is empty); chance = frac (the overlap of a random M_u)
      energy_fraction = ‖U_k U_kᵀ ΔW V_k V_kᵀ‖_F² / ‖ΔW‖_F² = ‖U_kᵀ ΔW V_k‖_F² / ‖ΔW‖_F² (0 if ΔW = 0)
      update_frac = |M_u| / numel
    τ is an absolute threshold when given. [APPROX] By default τ = 2**-8 · |W0| elementwise, our
    bf16-aware choice (the paper's exact threshold was not retrieved): bf16 keeps 8 significand bits,
    so a change smaller than 2**-8 of the weight can be rounding rather than learning, and does not
    count. An entry with W0 = 0 counts as updated as soon as it changes at all.
    """
    a, b = _pair(w0, w1)
    _check_rank(k, a)
    if threshold is not None and threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    dw = b - a
    tau = BF16_REL_RESOLUTION * a.abs() if threshold is None else threshold
    m_u = dw.abs() > tau
    m_p = principal_mask(a, k, frac)
    n_u = int(m_u.sum())
    overlap = int((m_u & m_p).sum()) / n_u if n_u else 0.0
    total = float(dw.square().sum())
    if total == 0.0:
        energy = 0.0
    else:
        u, _, vh = torch.linalg.svd(a, full_matrices=False)
        energy = float((u[:, :k].T @ dw @ vh[:k].T).square().sum()) / total
    return {"overlap": overlap, "chance": float(frac), "energy_fraction": energy, "update_frac": n_u / dw.numel()}


def matrix_report(w0: Tensor, w1: Tensor, k: int, frac: float) -> dict[str, float]:
    """All B.20 metrics for one matrix: drift (all and top-k), angles and update alignment."""
    return {
        "spectral_drift": spectral_drift(w0, w1),
        "spectral_drift_topk": spectral_drift(w0, w1, k),
        **principal_angles(w0, w1, k),
        **update_alignment(w0, w1, k, frac),
    }


def compare_state_dicts(
    sd0: dict[str, Tensor], sd1: dict[str, Tensor], k: int = 16, frac: float = 0.05, skip_embeddings: bool = True,
) -> dict:
    """Per-matrix B.20 metrics between two state dicts (checkpoint W0 → W1), and their means.

    A tensor is compared when it is present in both dicts, floating-point, 2-D, of the same shape
    in both, with min(shape) > 1, and (when `skip_embeddings`) its name does not contain "embed".
    k is clipped to min(shape) per matrix. Matrices whose W0 is all zero (e.g. a LoRA B at init)
    have no relative drift and are listed in "skipped_zero" instead. Computed in float64 on CPU.

    Returns {"per_matrix": {name: matrix_report}, "summary": {metric: mean over matrices},
    "n_matrices": int, "skipped_zero": [names]}.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    per_matrix: dict[str, dict[str, float]] = {}
    skipped_zero: list[str] = []
    for name, t0 in sd0.items():
        t1 = sd1.get(name)
        if t1 is None or not (torch.is_floating_point(t0) and torch.is_floating_point(t1)):
            continue
        if t0.dim() != 2 or t0.shape != t1.shape or min(t0.shape) <= 1:
            continue
        if skip_embeddings and "embed" in name:
            continue
        a, b = _as_matrix(t0), _as_matrix(t1)
        if not a.any():
            skipped_zero.append(name)
            continue
        per_matrix[name] = matrix_report(a, b, min(k, min(a.shape)), frac)
    summary: dict[str, float] = {}
    if per_matrix:
        for metric in next(iter(per_matrix.values())):
            summary[metric] = math.fsum(r[metric] for r in per_matrix.values()) / len(per_matrix)
    return {"per_matrix": per_matrix, "summary": summary, "n_matrices": len(per_matrix), "skipped_zero": skipped_zero}
