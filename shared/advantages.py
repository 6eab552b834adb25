"""Advantage estimators: pure functions of a flat reward vector and group ids (METHODS.md A).

| name        | A_i                                         | used by                          |
|-------------|---------------------------------------------|----------------------------------|
| `grpo`      | (r_i - mean_g) / (std_g + eps)              | GRPO, Visual-RFT, CLS-RL         |
| `dr_grpo`   | r_i - mean_g                                | Dr. GRPO                         |
| `batch_std` | (r_i - mean_g) / (std over the batch + eps) | "Lite PPO"-style normalisation   |
| `rloo`      | r_i - sum_{j!=i} r_j / (G - 1)              | RLOO                             |
| `none`      | r_i                                         | demonstrations, supplied weights |
| `remax`     | r_i - b(x), b = reward of the greedy output | ReMax (extra: `baseline`)        |
| `alol`      | max(r_i - V(x), 0), V a learned value head  | A-LoL (extra: `baseline`)        |
| `expert_iteration` | 1 for a verified (r > threshold) completion, first of its text in its group; else 0 | EI (extra: `unique`) |
| `raft`      | 1 for the first best-reward completion of each group, else 0 | RAFT best-of-K |
| `per_step`  | [B, T]: V(end of a token's step) - V(end of the previous step), V_0 = group mean | per-step credit on negatives (extra: `step_values`) |
| `mrt`       | r_i - J(c) + progress bonus_i, J = termination value of the group's prefix | MRT (extras: `baseline`, `progress_bonus`; shared/mrt.py) |

The last five take per-sample extras that the rollout carries (`Rollout.extras`); an estimator
declares them in its `needs` attribute and `compute_advantages` passes exactly those.

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


def remax(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6, *, baseline: Tensor) -> Tensor:
    """ReMax (Li et al. 2023; verl `compute_remax_outcome_advantage`): A_i = r_i - r(x, greedy output)."""
    return (rewards.double() - baseline.double().to(rewards.device)).to(rewards.dtype)


def alol(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6, *, baseline: Tensor) -> Tensor:
    """A-LoL (Baheti et al. 2023): A = max(R - V(x), 0); V is a value head fit to the reference's rewards."""
    return (rewards.double() - baseline.double().to(rewards.device)).clamp(min=0).to(rewards.dtype)


def expert_iteration(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6, *, unique: Tensor,
                     threshold: float = 0.5) -> Tensor:
    """Expert iteration: weight 1 on verified completions (r > threshold), each distinct text once per group."""
    keep = (rewards > threshold) & unique.to(device=rewards.device, dtype=torch.bool)
    return keep.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def raft(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """RAFT (Dong et al. 2023): weight 1 on the best-of-K completion of each group (first one on ties)."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    r = rewards.double()
    best = torch.full((int(inv.max()) + 1 if inv.numel() else 0,), -torch.inf, dtype=r.dtype, device=r.device)
    best = best.scatter_reduce(0, inv, r, "amax")
    is_best = r == best[inv]
    pos = torch.arange(len(r), device=r.device)
    first = torch.full_like(best, len(r), dtype=torch.long).scatter_reduce(
        0, inv[is_best], pos[is_best], "amin")
    return (pos == first[inv]).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def per_step(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6, *, step_values: Tensor) -> Tensor:
    """Per-token advantages [B, T] from step values (shared/step_values.py; NaN where no step ends).

    V_0 = the group's mean reward; a token in step k gets V(end of step k) - V(end of step k - 1), and the
    last step ends at the completion's last token with V = r_i. A completion with no inner step values
    (a correct one) therefore gets r_i - V_0 on every token (Dr. GRPO); an incorrect one splits the same
    total r_i - V_0 over its steps by how much each step changed the chance of ending correct.
    Positions after the last value (padding) get 0.
    """
    mean, _, _ = group_stats(rewards, group_ids)
    vals = step_values.to(device=rewards.device, dtype=torch.float64)
    is_value = ~torch.isnan(vals)
    prev, before = mean.clone(), torch.empty_like(vals)
    for t in range(vals.shape[1]):  # value at the end of the previous step, V_0 before the first
        before[:, t] = prev
        prev = torch.where(is_value[:, t], vals[:, t], prev)
    step_adv = vals - before
    out, nxt = torch.zeros_like(vals), torch.zeros_like(mean)
    for t in reversed(range(vals.shape[1])):  # every token takes the advantage of the step it ends in
        nxt = torch.where(is_value[:, t], step_adv[:, t], nxt)
        out[:, t] = nxt
    return out.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def mrt(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6, *, baseline: Tensor, progress_bonus: Tensor) -> Tensor:
    """MRT (Qu et al. 2025): the termination reward J(c) of the prefix replaces the group mean as baseline, plus
    alpha times the progress of the rollout's first episode (both computed in shared/mrt.py)."""
    dev = rewards.device
    return (rewards.double() - baseline.double().to(dev) + progress_bonus.double().to(dev)).to(
        rewards.dtype if rewards.is_floating_point() else torch.float32)


remax.needs = alol.needs = ("baseline",)
mrt.needs = ("baseline", "progress_bonus")
per_step.needs = ("step_values",)
expert_iteration.needs = ("unique", "threshold")

ADVANTAGES: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "batch_std": batch_std,
    "rloo": rloo,
    "none": none,
    "remax": remax,
    "alol": alol,
    "expert_iteration": expert_iteration,
    "raft": raft,
    "per_step": per_step,
    "mrt": mrt,
}


def compute_advantages(name: str, rewards: Tensor, group_ids: Tensor, eps: float = 1e-6, **extras) -> Tensor:
    """The estimator `name`; `extras` may hold more than it needs (only its `needs` are passed)."""
    fn = ADVANTAGES[name]
    needs = getattr(fn, "needs", ())
    optional = getattr(fn, "__kwdefaults__", None) or {}  # options with a default (expert_iteration's threshold)
    missing = [k for k in needs if k not in extras and k not in optional]
    if missing:
        raise ValueError(f"advantage {name!r} needs per-sample {', '.join(missing)} (not in the rollout)")
    return fn(rewards, group_ids, eps, **{k: extras[k] for k in needs if k in extras})


def zero_std_group_fraction(rewards: Tensor, group_ids: Tensor) -> float:
    """Fraction of groups whose rewards are all equal (they carry no group-relative signal)."""
    if rewards.numel() == 0:
        return 0.0
    _, std, _ = group_stats(rewards, group_ids)
    _, inv = torch.unique(group_ids, return_inverse=True)
    flat = torch.zeros(int(inv.max()) + 1, dtype=torch.float64, device=rewards.device)
    per_group = flat.scatter_reduce(0, inv, (std == 0).double(), "amin", include_self=False)
    return float(per_group.mean())


# --------------------------------------------------------------------------------------------
# DDPO per-prompt reward tracker (METHODS.md D.2) and advantage clipping
# --------------------------------------------------------------------------------------------

from collections import deque  # noqa: E402  (appended section; keeps the estimators above untouched)

import numpy as np  # noqa: E402


def clip_advantages(adv: Tensor, limit: float | None) -> Tensor:
    """Clamp advantages to [-limit, limit] (DDPO: 5; config `algorithm.adv_clip`). None: unchanged."""
    if limit is None:
        return adv
    if limit <= 0:
        raise ValueError(f"advantage clip limit must be > 0, got {limit}")
    return adv.clamp(-limit, limit)


class PerPromptTracker:
    """Per-prompt reward normalisation of DDPO (kvablack/ddpo-pytorch `PerPromptStatTracker`).

    For each distinct prompt key in a batch, that prompt's rewards of this batch are appended to its
    buffer (a deque of at most `buffer_size` rewards) FIRST; then, if the buffer holds fewer than
    `min_count` rewards, the mean/std of the WHOLE current batch of rewards are used, otherwise the
    mean/std of the buffer:

        A_i = (r_i - mean) / (std + eps)

    std is the POPULATION standard deviation (ddof = 0, numpy's default, as in DDPO) -- unlike the
    unbiased std of the group estimators above. Statistics are computed in float64. State is plain
    python (`state_dict()` / `load_state_dict()`), so checkpoints pickle without torch.
    """

    def __init__(self, buffer_size: int, min_count: int, eps: float = 1e-6):
        if buffer_size <= 0 or min_count <= 0:
            raise ValueError(f"buffer_size and min_count must be > 0, got {buffer_size}, {min_count}")
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.eps = float(eps)
        self.buffers: dict[str, deque[float]] = {}

    def __call__(self, keys: list[str], rewards: Tensor) -> Tensor:
        if len(keys) != rewards.numel():
            raise ValueError(f"{len(keys)} keys for {rewards.numel()} rewards")
        r = np.asarray(rewards.detach().to("cpu", torch.float64).reshape(-1).numpy())
        key_arr = np.asarray(keys, dtype=object)
        adv = np.empty_like(r)
        batch_mean, batch_std = float(np.mean(r)) if r.size else 0.0, float(np.std(r)) if r.size else 0.0
        for key in dict.fromkeys(keys):  # distinct keys, first-seen order
            sel = key_arr == key
            buf = self.buffers.setdefault(key, deque(maxlen=self.buffer_size))
            buf.extend(float(x) for x in r[sel])
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = float(np.mean(buf)), float(np.std(buf))
            adv[sel] = (r[sel] - mean) / (std + self.eps)
        out = torch.from_numpy(adv).reshape(rewards.shape)
        dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
        return out.to(device=rewards.device, dtype=dtype)

    def stats(self) -> dict[str, int]:
        return {"tracked_prompts": len(self.buffers)}

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "eps": self.eps,
            "buffers": {k: list(v) for k, v in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore buffers (keeping this tracker's buffer_size / min_count / eps settings)."""
        self.buffers = {str(k): deque((float(x) for x in v), maxlen=self.buffer_size)
                        for k, v in state["buffers"].items()}
