"""Policy-gradient objectives: pure functions of per-step log-probs (METHODS.md A).

Every objective has the signature

    objective(logp, old_logp, ref_logp, adv, mask, cfg, norm, **batch) -> (loss, metrics)

with `logp`, `old_logp`, `ref_logp`, `mask` of shape [B, T] (T = completion tokens for LM/VLM,
denoising steps for diffusion), `adv` of shape [B], `cfg` the `AlgorithmConfig` and `norm` the
`StepNorm` of the whole optimizer step. `loss` is this micro-batch's share of the step loss (sum
the shares to get the step loss) and every metric is likewise a share of a step-level token mean.
Objectives that need the group structure (pairwise losses) read it from `batch` (`group_ids`,
`rewards`). `ref_logp` is None when no reference is used.

The registry is a plain dict; domain packages add their objectives to it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from shared.aggregation import StepNorm, aggregate
from shared.kl import kl_penalty

Metrics = dict[str, Tensor]
Objective = Callable[..., tuple[Tensor, Metrics]]

MAX_LOG_RATIO = 20.0  # guards exp() of a log-ratio; only reached by a diverged policy


def sequence_log_ratio(log_ratio: Tensor, mask: Tensor) -> Tensor:
    """GSPO: log s_i = mean_t log rho_{i,t} over the sequence's tokens, broadcast to [B, T]."""
    m = mask.to(log_ratio.dtype)
    per_seq = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    return per_seq.expand_as(log_ratio)


def clipped_surrogate(
    ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float, dual_clip: float | None = None,
    center: Tensor | float = 1.0,
) -> Tensor:
    """Per-step PPO-clip loss  -min(rho*A, clip(rho, c(1-eps_low), c(1+eps_high))*A)  (to be minimised).

    `center` c is 1 for on-policy samples. For a replayed sample (DOTS rollout replay, METHODS.md
    B.8) rho = pi_theta / mu is the ratio to the behaviour policy mu that sampled it and
    c = pi_old / mu, so the clip range sits around pi_old, importance-weighted to mu.
    With dual clip (c > 1), for A < 0 the loss is additionally capped at -c*A (Ye et al. 2020).
    `adv` broadcasts against `ratio`.
    """
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, center * (1.0 - eps_low), center * (1.0 + eps_high))
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    return loss


def ppo_clip(logp, old_logp, ref_logp, adv, mask, cfg, norm: StepNorm, **batch) -> tuple[Tensor, Metrics]:
    """GRPO / DAPO / Dr.GRPO / RLOO / GSPO surrogate; which one is chosen by config alone.

    - ratio rho_t = exp(logp_t - old_logp_t); `ratio_level: sequence` uses GSPO's
      s_i = exp(mean_t log rho_t) for every token of sequence i (Zheng et al. 2025, eq. 7).
    - clip-higher: separate eps_low / eps_high (DAPO); optional dual clip.
    - KL: with `kl_placement: loss` and beta > 0, beta * k(logp, ref_logp) is added per step and
      aggregated like the surrogate (GRPO eq. 3).
    - per-sample weights (two-attempt rollouts, shared/attempts.py): `pg_weight` [B] multiplies each
      sample's advantage and `kl_coef` [B] replaces beta as its KL coefficient.
    - replay: `behaviour_logp` [B, T] (rollout replay) holds log mu of replayed samples and NaN for
      fresh ones; rho = pi_theta / mu with the clip centred on pi_old / mu (`clipped_surrogate`),
      which is the plain surrogate where mu = pi_old.
    """
    behaviour = batch.get("behaviour_logp")
    mu = old_logp if behaviour is None else torch.where(torch.isnan(behaviour), old_logp, behaviour)
    log_ratio = (logp - mu).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    log_center = (old_logp - mu).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    if cfg.ratio_level == "sequence":
        log_ratio, log_center = sequence_log_ratio(log_ratio, mask), sequence_log_ratio(log_center, mask)
    ratio = log_ratio.exp()
    center = log_center.exp() if behaviour is not None else 1.0
    a = adv.to(ratio.dtype)
    if "pg_weight" in batch:
        a = a * (batch["pg_weight"].to(a) if a.dim() == 1 else batch["pg_weight"].to(a).unsqueeze(-1))
    a = a.unsqueeze(-1) if a.dim() == 1 else a  # [B] per sequence or [B, T] per token (advantage: per_step)
    per_step = clipped_surrogate(ratio, a, cfg.eps_low, cfg.eps_high, cfg.dual_clip, center)

    metrics: Metrics = {}
    coef = batch["kl_coef"].to(ratio.dtype).unsqueeze(-1) if "kl_coef" in batch else cfg.beta
    if ref_logp is not None and (cfg.beta > 0 or "kl_coef" in batch):
        kl = kl_penalty(logp, ref_logp, cfg.kl_estimator, cfg.kl_clamp)
        if cfg.kl_placement == "loss":
            per_step = per_step + coef * kl
        metrics["kl_ref"] = aggregate(kl.detach(), mask, "token_mean", norm)

    loss = aggregate(per_step, mask, cfg.loss_agg, norm)
    with torch.no_grad():
        low = ((ratio < center * (1.0 - cfg.eps_low)) & (a < 0)).to(ratio.dtype)
        high = ((ratio > center * (1.0 + cfg.eps_high)) & (a > 0)).to(ratio.dtype)
        metrics["clip_frac_low"] = aggregate(low, mask, "token_mean", norm)
        metrics["clip_frac_high"] = aggregate(high, mask, "token_mean", norm)
        metrics["kl_old"] = aggregate(0.5 * (log_ratio - log_center).square(), mask, "token_mean", norm)
        metrics["ratio_mean"] = aggregate(ratio, mask, "token_mean", norm)
    return loss, metrics


OBJECTIVES: dict[str, Objective] = {
    "ppo_clip": ppo_clip,
}
