"""Diffusion objectives (METHODS.md D); registered into `shared.objectives.OBJECTIVES` on import.

PRDP: Proximal Reward Difference Prediction (Deng et al. 2024, arXiv 2402.08714, CVPR 2024).
[PAPER; no official code] -- written from the paper (eqs. and Alg. 1) and METHODS.md D.3.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shared.aggregation import StepNorm, aggregate
from shared.objectives import OBJECTIVES, Metrics


def _compute_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def prdp(logp, old_logp, ref_logp, adv, mask, cfg, norm: StepNorm, **batch) -> tuple[Tensor, Metrics]:
    """PRDP reward-difference-prediction loss (METHODS.md D.3).  [PAPER; no official code]

    For sample i with trained denoising steps M_i = {t : mask[i,t] > 0}:

        r̂_i     = mean_{t in M_i} (logp_t - ref_t)                                (predicted reward)
        r̂clip_i = mean_{t in M_i} (clamp(logp_t, old_t - eps, old_t + eps) - ref_t)
                = mean_{t in M_i} clip(logp_t - ref_t, old_t - ref_t - eps, old_t - ref_t + eps)

    and for every unordered pair i < j of one group (same prompt, `group_ids`) with r_i != r_j:

        l     = (r̂_i     - r̂_j     - (r_i - r_j) / beta)^2
        lclip = (r̂clip_i - r̂clip_j - (r_i - r_j) / beta)^2
        pair loss = max(l, lclip)

    group loss = mean over its valid pairs (0 if none); step loss = mean over the step's groups.
    beta = cfg.beta (> 0, else ValueError), eps = cfg.prdp_eps. `adv` is unused (PRDP regresses the
    raw reward differences); `rewards` [B] and `group_ids` [B] come in `batch`.

    Averaging over steps (not summing as in the paper's eq.) follows the reference description;
    note also that our per-step log-probs are AVERAGED over latent dimensions (METHODS.md D.1), so
    r̂ is on a much smaller scale than a summed log-density and beta's useful range depends on this
    normalisation (paper: beta 3e-5 / 3e-6 for SD1.4 with its own normalisation).

    Micro-batching: every group must lie whole inside one micro-batch and all groups have the same
    size G (read from the `group_ids` counts). The returned loss is this micro-batch's share

        sum_{groups here} group_loss / (norm.num_seqs / G)

    where norm.num_seqs counts sequences with any mask > 0 in the whole optimizer step, so
    num_seqs / G is the step's number of (non-filler) groups. Groups whose mask is all zero
    (dynamic-sampling filler) contribute nothing; samples with an all-zero mask take part in no pair.
    Metrics are shares with the same normalisation (per-group means, then mean over groups).
    """
    if cfg.beta <= 0:
        raise ValueError(f"prdp needs algorithm.beta > 0 (got {cfg.beta}): the loss divides reward gaps by beta")
    if ref_logp is None:
        raise ValueError("prdp needs reference log-probs (ref_logp is None)")
    if "group_ids" not in batch or "rewards" not in batch:
        raise ValueError("prdp needs `group_ids` and `rewards` in the batch")
    group_ids: Tensor = batch["group_ids"]
    dtype = _compute_dtype(logp)
    rewards: Tensor = batch["rewards"].to(device=logp.device, dtype=dtype)
    eps, beta = float(cfg.prdp_eps), float(cfg.beta)

    m = mask.to(dtype)
    lp, old, ref = logp.to(dtype), old_logp.to(dtype), ref_logp.to(dtype)
    steps = m.sum(-1)  # [B]
    active = steps > 0
    denom = steps.clamp(min=1.0)
    r_hat = ((lp - ref) * m).sum(-1) / denom
    lp_clip = torch.clamp(lp, min=old - eps, max=old + eps)
    r_hat_clip = ((lp_clip - ref) * m).sum(-1) / denom

    # pair matrix: same group, i < j, both samples trained
    _, inv, counts = torch.unique(group_ids.to(logp.device), return_inverse=True, return_counts=True)
    if counts.numel() and bool((counts != counts[0]).any()):
        raise ValueError(f"prdp needs groups of equal size in a micro-batch, got sizes {counts.tolist()}")
    n_groups_mb = counts.numel()
    group_size = float(counts[0]) if n_groups_mb else 1.0
    b = logp.shape[0]
    upper = torch.ones(b, b, dtype=torch.bool, device=logp.device).triu(diagonal=1)
    same = (inv.unsqueeze(0) == inv.unsqueeze(1)) & upper & active.unsqueeze(0) & active.unsqueeze(1)
    valid = same & (rewards.unsqueeze(1) != rewards.unsqueeze(0))

    target = (rewards.unsqueeze(1) - rewards.unsqueeze(0)) / beta  # [B, B]: (r_i - r_j) / beta
    err = r_hat.unsqueeze(1) - r_hat.unsqueeze(0) - target
    err_clip = r_hat_clip.unsqueeze(1) - r_hat_clip.unsqueeze(0) - target
    vf = valid.to(dtype)
    # zero out invalid pairs BEFORE the max so they carry no gradient (and no inf/nan from targets)
    l = torch.where(valid, err, torch.zeros_like(err)).square()
    l_clip = torch.where(valid, err_clip, torch.zeros_like(err_clip)).square()
    pair_loss = torch.maximum(l, l_clip)

    zeros = torch.zeros(n_groups_mb, dtype=dtype, device=logp.device)
    n_valid = zeros.index_add(0, inv, vf.sum(1))
    n_valid_c = n_valid.clamp(min=1.0)
    n_groups_step = max(norm.num_seqs / group_size, 1.0)

    def share(per_pair: Tensor) -> Tensor:
        """sum over this micro-batch's groups of (mean over the group's valid pairs) / step groups."""
        per_group = zeros.index_add(0, inv, (per_pair * vf).sum(1)) / n_valid_c
        return per_group.sum() / n_groups_step

    loss = share(pair_loss)

    metrics: Metrics = {}
    with torch.no_grad():
        metrics["prdp_loss_unclipped"] = share(l.detach())
        metrics["clip_frac"] = share((l_clip > l).to(dtype))
        metrics["reward_pred_gap"] = share(err.detach().abs())
        n_pairs = zeros.index_add(0, inv, same.to(dtype).sum(1))
        metrics["valid_pair_frac"] = (n_valid / n_pairs.clamp(min=1.0)).sum() / n_groups_step
        metrics["kl_ref"] = aggregate((lp - ref).detach(), mask, "token_mean", norm)
    return loss, metrics


# what the config check (shared.config) enforces for this objective
prdp.needs_whole_groups = True  # pairs are formed inside a micro-batch
prdp.needs_reference = True  # beta > 0, and the KL lives in the objective (kl_placement: loss)
OBJECTIVES["prdp"] = prdp
