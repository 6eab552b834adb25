"""Advantage estimators: pure functions of a flat reward vector and group ids (METHODS.md A).

| name        | A_i                                         | used by                          |
|-------------|---------------------------------------------|----------------------------------|
| `grpo`      | (r_i - mean_g) / (std_g + eps)              | GRPO, Visual-RFT, CLS-RL         |
| `dr_grpo`   | r_i - mean_g                                | Dr. GRPO                         |
| `batch_std` | (r_i - mean_g) / (std over the batch + eps) | "Lite PPO"-style normalisation   |
| `rloo`      | r_i - sum_{j!=i} r_j / (G - 1)              | RLOO                             |
| `none`      | r_i                                         | baselines supplied elsewhere     |

std is the unbiased sample standard deviation (torch.std default, as in TRL and verl); a group of
one sample has std 0. eps defaults to 1e-6 (verl's value; config `algorithm.adv_eps`). A group whose
rewards are all equal gets A = 0 under every group-relative estimator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def group_stats(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample (group mean, group unbiased std, group size), computed with scatter ops.

    A group whose rewards are all equal gets exactly its common value as mean and exactly 0 as
    std (floating-point sums would otherwise leave a ~1e-17 residue that hides "no signal").
    """
    rewards = rewards.double()
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    zeros = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device)
    count = zeros.index_add(0, inv, torch.ones_like(rewards))
    mean = zeros.index_add(0, inv, rewards) / count.clamp(min=1)
    lo = zeros.scatter_reduce(0, inv, rewards, "amin", include_self=False)
    hi = zeros.scatter_reduce(0, inv, rewards, "amax", include_self=False)
    constant = lo == hi
    mean = torch.where(constant, lo, mean)
    sq = zeros.index_add(0, inv, (rewards - mean[inv]) ** 2)
    var = torch.where((count > 1) & ~constant, sq / (count - 1).clamp(min=1), zeros)
    return mean[inv], var.sqrt()[inv], count[inv]


def _safe_div(x: Tensor, std: Tensor, eps: float) -> Tensor:
    """x / (std + eps), defined as 0 where std == 0 (so eps = 0 never yields NaN)."""
    return torch.where(std > 0, x / (std + eps), x / eps if eps > 0 else torch.zeros_like(x))


def grpo(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    mean, std, _ = group_stats(rewards, group_ids)
    return _safe_div(rewards.double() - mean, std, eps).to(rewards.dtype)


def dr_grpo(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    mean, _, _ = group_stats(rewards, group_ids)
    return (rewards.double() - mean).to(rewards.dtype)


def batch_std(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    mean, _, _ = group_stats(rewards, group_ids)
    r = rewards.double()
    std = r.std() if r.numel() > 1 and bool(r.max() > r.min()) else r.new_zeros(())
    return _safe_div(r - mean, std.expand_as(r), eps).to(rewards.dtype)


def rloo(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    mean, std, count = group_stats(rewards, group_ids)
    if bool((count < 2).any()):
        raise ValueError("rloo needs at least 2 samples in every group")
    # sum_{j!=i} r_j / (G-1) = (G*mean - r_i) / (G-1)
    loo = (count * mean - rewards.double()) / (count - 1)
    adv = torch.where(std > 0, rewards.double() - loo, torch.zeros_like(loo))  # constant group: exactly 0
    return adv.to(rewards.dtype)


def none(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    return rewards.clone()


ADVANTAGES: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "batch_std": batch_std,
    "rloo": rloo,
    "none": none,
}


def compute_advantages(name: str, rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    return ADVANTAGES[name](rewards, group_ids, eps)


def zero_std_group_fraction(rewards: Tensor, group_ids: Tensor) -> float:
    """Fraction of groups whose rewards are all equal (they carry no group-relative signal)."""
    if rewards.numel() == 0:
        return 0.0
    _, std, _ = group_stats(rewards, group_ids)
    _, inv = torch.unique(group_ids, return_inverse=True)
    flat = torch.zeros(int(inv.max()) + 1, dtype=torch.float64, device=rewards.device)
    per_group = flat.scatter_reduce(0, inv, (std == 0).double(), "amin", include_self=False)
    return float(per_group.mean())
