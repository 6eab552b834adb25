"""Text objectives of the seed papers (METHODS.md part B); registered into `shared.objectives.OBJECTIVES`.

Every function follows the shared contract (shared/objectives.py)

    objective(logp, old_logp, ref_logp, adv, mask, cfg, norm, **batch) -> (loss, metrics)

and returns this micro-batch's share of the optimizer step's loss. Token-level losses go through
`aggregate(..., cfg.loss_agg, norm)`; sequence- and pair-level losses divide by the step's sequence
or group count from `norm`, so micro-batching and gradient accumulation never change the step.
Objectives that pair samples of one prompt set `needs_whole_groups` (the config check then asks for a
micro-batch size that is a multiple of the group size); those that read a frozen reference set
`needs_reference` (beta > 0 is their temperature / KL weight) or `uses_reference` (the reference is
built whatever beta is). `forward_options(cfg)` asks the policy for a different forward pass (IFT)
or extra per-token outputs (ASFT's full-vocabulary KL), which arrive in `batch`.

| name    | method                                              | source                     |
|---------|-----------------------------------------------------|----------------------------|
| `nft`   | Negative-aware Fine-Tuning (implicit negative policy) | B.1 [CODE]               |
| `copg`  | Contrastive Policy Gradient (regularised-reward pairs) | B.2 [APPROX]            |
| `dpo`   | DPO / IPO / hinge on preference pairs (`pref_loss`) | Rafailov et al. 2023, Azar et al. 2023 |
| `modpo` | multi-objective DPO with margin rewards             | B.4 [CODE]                 |
| `alol`  | A-LoL: seq / token / kl / ref_free (`alol_variant`) | B.3 [CODE]                 |
| `sft`   | advantage-weighted NLL (EI / RAFT / demonstrations) | B.14                       |
| `dft`   | Dynamic Fine-Tuning: NLL weighted by sg(p)          | B.5 [CODE]                 |
| `asft`  | DFT + beta * KL(pi_base || pi_theta) over the vocabulary | B.5 [CODE]            |
| `ift`   | Intuitive Fine-Tuning (residual inputs, cumulative weights) | B.6 [CODE]         |
"""

from __future__ import annotations

import torch
from torch import Tensor

from shared.aggregation import StepNorm, aggregate
from shared.objectives import MAX_LOG_RATIO, OBJECTIVES, Metrics

NFT_RHAT_RANGE = (0.02, 0.98)  # the authors' clamp of the group's correct fraction


def _f32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _groups(group_ids: Tensor, device) -> tuple[Tensor, int]:
    """(inverse index [B], number of groups) of this micro-batch."""
    _, inv = torch.unique(group_ids.to(device), return_inverse=True)
    return inv, int(inv.max()) + 1 if inv.numel() else 0


def _step_groups(norm: StepNorm, inv: Tensor, active: Tensor) -> float:
    """Groups in the whole optimizer step, from its sequence count and this micro-batch's group size."""
    counts = torch.bincount(inv[active], minlength=1)
    size = float(counts[counts > 0].float().mean()) if bool((counts > 0).any()) else 1.0
    return max(norm.num_seqs / size, 1.0)


def _pair_share(pair_loss: Tensor, valid: Tensor, inv: Tensor, n_groups: int, step_groups: float) -> Tensor:
    """Sum over this micro-batch's groups of (mean over the group's valid pairs) / groups in the step."""
    vf = valid.to(pair_loss.dtype)
    zeros = pair_loss.new_zeros(n_groups)
    per_group = zeros.index_add(0, inv, (torch.where(valid, pair_loss, 0.0) * vf).sum(1))
    n_valid = zeros.index_add(0, inv, vf.sum(1))
    return (per_group / n_valid.clamp(min=1.0)).sum() / step_groups


def _need(batch: dict, *keys: str, who: str) -> None:
    missing = [k for k in keys if batch.get(k) is None]
    if missing:
        raise ValueError(f"{who} needs {', '.join(missing)} in the batch")


# ------------------------------------------------------------------------------------------ NFT
def nft(logp, old_logp, ref_logp, adv, mask, cfg, norm: StepNorm, **batch) -> tuple[Tensor, Metrics]:
    """NFT (Chen et al. 2025, arXiv 2505.18116; NVlabs/NFT dp_actor.py). [CODE]

    r̂ = fraction of the group's samples with reward > cfg.positive_threshold, clamped to [0.02, 0.98];
    R_t = pi_theta / pi_old per token. Positive samples: l_t = -log R_t. Negative samples (maximum
    likelihood under the implicit negative policy pi^- = (pi_old - r̂ pi_theta) / (1 - r̂)):

        l_t = -log STclamp((1 - r̂ R_t) / (1 - r̂), eps),   STclamp(x, eps) = x + sg(max(x, eps) - x)

    (value clipped at eps = cfg.nft_clamp, gradient -grad x / max(x, eps); the authors' scripts use 1).
    Question weight w = 1 - r̂ (`nft_weighting: one_minus_rhat`) or sqrt((1 - r̂) / r̂) (`std`); at
    R = 1 the gradient equals GRPO's with A = r - r̂ (Dr. GRPO form) or (r - r̂) / sqrt(r̂(1 - r̂))
    (std-normalised with the population std). Groups that are all positive or all negative get weight 0
    (the authors drop them by dynamic sampling). Aggregated with `cfg.loss_agg` (the authors divide a
    token sum by a constant: `seq_mean_token_sum_norm`).
    """
    _need(batch, "group_ids", "rewards", who="nft")
    lp, old = _f32(logp), _f32(old_logp)
    inv, n = _groups(batch["group_ids"], lp.device)
    pos = (batch["rewards"].to(lp.device) > cfg.positive_threshold).to(lp.dtype)
    zeros = lp.new_zeros(n)
    frac = (zeros.index_add(0, inv, pos) / zeros.index_add(0, inv, torch.ones_like(pos)))[inv]
    informative = (frac > 0) & (frac < 1)
    r_hat = frac.clamp(*NFT_RHAT_RANGE).unsqueeze(-1)
    log_ratio = (lp - old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    x = (1.0 - r_hat * log_ratio.exp()) / (1.0 - r_hat)
    x_st = x + (x.clamp(min=cfg.nft_clamp) - x).detach()
    per_token = torch.where(pos.unsqueeze(-1) > 0, -log_ratio, -torch.log(x_st))
    w = (1.0 - r_hat) if cfg.nft_weighting == "one_minus_rhat" else ((1.0 - r_hat) / r_hat).sqrt()
    w = w * informative.unsqueeze(-1).to(lp.dtype)
    loss = aggregate(w * per_token, mask, cfg.loss_agg, norm)
    with torch.no_grad():
        neg = (1 - pos).unsqueeze(-1) * mask
        metrics = {"nft_clamped_frac": aggregate(((x < cfg.nft_clamp).to(lp.dtype) * neg), mask, "token_mean", norm),
                   "nft_rhat": aggregate(r_hat.expand_as(lp), mask, "token_mean", norm)}
    return loss, metrics


# ----------------------------------------------------------------------------------- pairwise
def _seq_log_ratio(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """sum_t (log pi_theta - log pi_ref) over each sequence's trained tokens: [B]."""
    return ((_f32(logp) - _f32(ref_logp)) * mask.to(torch.float32)).sum(-1)


def copg(logp, old_logp, ref_logp, adv, mask, cfg, norm: StepNorm, **batch) -> tuple[Tensor, Metrics]:
    """CoPG (Flet-Berliac et al. 2024, arXiv 2406.19185). [APPROX: no code found; METHODS.md B.2]

    Regularised reward R_beta(y) = R(y) - beta * log(pi_theta(y) / pi_ref(y)) (sequence log-ratio).
    For a group of k samples (on- or off-policy: no importance weights):

        l_group = 1 / (k - 1) * sum_{i > j} (R_beta(y_i) - R_beta(y_j))^2

    Its fixed point is pi* ∝ pi_ref exp(R / beta) under any sampling policy. Loss = mean over groups.
    """
    _need(batch, "group_ids", "rewards", who="copg")
    h = _seq_log_ratio(logp, ref_logp, mask)
    inv, n = _groups(batch["group_ids"], h.device)
    active = mask.sum(-1) > 0
    r_beta = batch["rewards"].to(h) - cfg.beta * h
    diff = r_beta.unsqueeze(1) - r_beta.unsqueeze(0)
    same = (inv.unsqueeze(0) == inv.unsqueeze(1)) & torch.ones_like(diff, dtype=torch.bool).triu(1)
    same = same & active.unsqueeze(0) & active.unsqueeze(1)
    pair = torch.where(same, diff.square(), 0.0)
    per_group = h.new_zeros(n).index_add(0, inv, pair.sum(1))
    size = h.new_zeros(n).index_add(0, inv, active.to(h.dtype))  # trained samples per group (k)
    loss = (per_group / (size - 1).clamp(min=1)).sum() / _step_groups(norm, inv, active)
    with torch.no_grad():
        metrics = {"copg_reg_reward": (r_beta * active).sum() / max(norm.num_seqs, 1.0),
                   "kl_ref": aggregate(_f32(logp - ref_logp).detach(), mask, "token_mean", norm),
                   "copg_group_size": (size[inv] * active).sum() / max(norm.num_seqs, 1.0)}
    return loss, metrics


def _preference_pairs(batch: dict, mask: Tensor) -> tuple[Tensor, Tensor, int]:
    """valid[i, j] = i preferred to j (same group, r_i > r_j, both trained); inverse group index; groups."""
    inv, n = _groups(batch["group_ids"], mask.device)
    r = batch["rewards"].to(mask.device)
    active = mask.sum(-1) > 0
    valid = (inv.unsqueeze(1) == inv.unsqueeze(0)) & (r.unsqueeze(1) > r.unsqueeze(0))
    return valid & active.unsqueeze(1) & active.unsqueeze(0), inv, n


def preference_loss(margin: Tensor, kind: str, beta: float) -> Tensor:
    """Loss of a log-ratio margin h = [log pi/pi_ref](y_w) - [log pi/pi_ref](y_l).

    sigmoid (DPO): -log sigmoid(beta h); ipo: (h - 1 / (2 beta))^2 (tau = beta); hinge: relu(1 - beta h).
    """
    if kind == "sigmoid":
        return -torch.nn.functional.logsigmoid(beta * margin)
    if kind == "ipo":
        return (margin - 1.0 / (2.0 * beta)).square()
    if kind == "hinge":
        return torch.relu(1.0 - beta * margin)
    raise ValueError(f"unknown preference loss {kind!r}; choose sigmoid, ipo or hinge")


def dpo(logp, old_logp, ref_logp, adv, mask, cfg, norm: StepNorm, **batch) -> tuple[Tensor, Metrics]:
    """DPO / IPO / hinge (`cfg.pref_loss`) over every (preferred, dispreferred) pair of a group.

    A preference pair is a group of two with rewards (1, 0); a group of G sampled completions gives all
    pairs with r_i > r_j (online DPO). Each group's loss is the mean over its pairs; loss = mean over
    groups. beta = cfg.beta (DPO's temperature, IPO's tau).
    """
    _need(batch, "group_ids", "rewards", who="dpo")
    h = _seq_log_ratio(logp, ref_logp, mask)
    valid, inv, n = _preference_pairs(batch, mask)
    margin = h.unsqueeze(1) - h.unsqueeze(0)
    return _pair_objective(preference_loss(margin, cfg.pref_loss, cfg.beta), margin, valid, inv, n, mask, norm, cfg)


def _pair_objective(pair_loss, margin, valid, inv, n, mask, norm, cfg) -> tuple[Tensor, Metrics]:
    step_groups = _step_groups(norm, inv, mask.sum(-1) > 0)
    loss = _pair_share(pair_loss, valid, inv, n, step_groups)
    with torch.no_grad():
        metrics = {"pref_accuracy": _pair_share((margin > 0).to(margin.dtype), valid, inv, n, step_groups),
                   "pref_margin": _pair_share(cfg.beta * margin.detach(), valid, inv, n, step_groups)}
    return loss, metrics


def modpo(logp, old_logp, ref_logp, adv, mask, cfg, norm: StepNorm, **batch) -> tuple[Tensor, Metrics]:
    """MODPO (Zhou et al. 2023, arXiv 2310.03708; ZHZisZZ/modpo `modpo_loss`). [CODE]

    With w = cfg.modpo_weight the weight of the objective the preferences express and m(x, y) the margin
    reward of the other objective (`margin` per sample, from the data's `margins`), weighted by 1 - w:

        u(y) = (1 / w) * [beta * log(pi_theta(y) / pi_ref(y)) - (1 - w) * m(x, y)]
        loss = -log sigmoid(u(y_w) - u(y_l))          (hinge: relu(1 - (u_w - u_l)) with pref_loss: hinge)
    """
    _need(batch, "group_ids", "rewards", "margin", who="modpo")
    w = cfg.modpo_weight
    u = (cfg.beta * _seq_log_ratio(logp, ref_logp, mask) - (1.0 - w) * _f32(batch["margin"].to(mask.device))) / w
    valid, inv, n = _preference_pairs(batch, mask)
    delta = u.unsqueeze(1) - u.unsqueeze(0)
    pair = torch.relu(1.0 - delta) if cfg.pref_loss == "hinge" else -torch.nn.functional.logsigmoid(delta)
    return _pair_objective(pair, delta / cfg.beta, valid, inv, n, mask, norm, cfg)


# ------------------------------------------------------------------------------------- A-LoL
def alol(logp, old_logp, ref_logp, adv, mask, cfg, norm: StepNorm, **batch) -> tuple[Tensor, Metrics]:
    """A-LoL (Baheti et al. 2023, arXiv 2305.14718; abaheti95/LoL-RL). [CODE]

    A = max(R - V(x), 0) comes from the `alol` advantage. NLL(y) = -sum_t log pi_theta(y_t); eps = cfg.alol_clip.
    - seq:      A * clip(sg(pi_theta(y) / pi_ref(y)), 1 - eps, 1 + eps) * NLL(y)   (sequence ratio)
    - token:    A * sum_t clip(sg(pi_theta(y_t) / pi_ref(y_t)), 1 - eps, 1 + eps) * (-log pi_theta(y_t))
    - kl:       A * NLL(y) + beta * (log pi_theta(y) - log pi_ref(y))
    - ref_free: A * NLL(y)
    Per-token terms are aggregated with `cfg.loss_agg` (the authors' per-sequence sum: seq_mean_token_sum).
    """
    lp = _f32(logp)
    a = adv.to(lp).unsqueeze(-1)
    variant, lo, hi = cfg.alol_variant, 1.0 - cfg.alol_clip, 1.0 + cfg.alol_clip
    if variant != "ref_free" and ref_logp is None:
        raise ValueError(f"alol ({variant}) needs reference log-probs")
    if variant == "seq":
        seq = _seq_log_ratio(lp, ref_logp, mask).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        weight = seq.exp().clamp(lo, hi).detach().unsqueeze(-1)
    elif variant == "token":
        weight = (lp - _f32(ref_logp)).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp().clamp(lo, hi).detach()
    else:
        weight = torch.ones_like(lp)
    per_token = -a * weight * lp
    if variant == "kl":
        per_token = per_token + cfg.beta * (lp - _f32(ref_logp))
    loss = aggregate(per_token, mask, cfg.loss_agg, norm)
    with torch.no_grad():
        metrics = {"alol_positive_frac": ((adv > 0) & (mask.sum(-1) > 0)).sum().float() / max(norm.num_seqs, 1.0),
                   "alol_weight": aggregate(weight.expand_as(lp), mask, "token_mean", norm)}
    return loss, metrics


# --------------------------------------------------------------------------- supervised family
def sft(logp, old_logp, ref_logp, adv, mask, cfg, norm: StepNorm, **batch) -> tuple[Tensor, Metrics]:
    """Advantage-weighted NLL: l_t = -A_i log pi_theta(y_t). With `advantage: none` on demonstrations
    (reward 1) it is SFT; with `expert_iteration` / `raft` it is the SFT step of EI / RAFT. Under `token_mean`
    the sum is divided by all tokens of the step, kept or not, so a step that keeps fewer samples moves less."""
    lp = _f32(logp)
    loss = aggregate(-adv.to(lp).unsqueeze(-1) * lp, mask, cfg.loss_agg, norm)
    return loss, {"kept_frac": ((adv != 0) & (mask.sum(-1) > 0)).sum().float() / max(norm.num_seqs, 1.0)}


def dft(logp, old_logp, ref_logp, adv, mask, cfg, norm: StepNorm, **batch) -> tuple[Tensor, Metrics]:
    """DFT (Wu et al. 2025, arXiv 2508.05629): l_t = -A_i sg(p_t) log p_t, p_t = pi_theta(y_t). [CODE]"""
    lp = _f32(logp)
    p = lp.detach().exp()
    loss = aggregate(-adv.to(lp).unsqueeze(-1) * p * lp, mask, cfg.loss_agg, norm)
    return loss, {"token_prob": aggregate(p, mask, "token_mean", norm)}


def asft(logp, old_logp, ref_logp, adv, mask, cfg, norm: StepNorm, **batch) -> tuple[Tensor, Metrics]:
    """ASFT (arXiv 2509.23711; zhuchichi56/ASFT mode "asft"): DFT + beta * KL(pi_base || pi_theta)(. | ctx_t),
    the KL over the full vocabulary to the frozen initial model (`vocab_kl`, from the policy's forward). [CODE]"""
    _need(batch, "vocab_kl", who="asft")
    loss, metrics = dft(logp, old_logp, ref_logp, adv, mask, cfg, norm)
    kl = _f32(batch["vocab_kl"])
    metrics["vocab_kl"] = aggregate(kl.detach(), mask, "token_mean", norm)
    return loss + cfg.beta * aggregate(kl, mask, cfg.loss_agg, norm), metrics


def ift_weights(nll: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """IFT relation-propagation weights: w_t = sum_{k>=t} gamma^(k-t) l_k / L, rescaled so sum_t w_t = L
    (L = the sequence's trained tokens). Not detached, as in the authors' code."""
    m = mask.to(nll.dtype)
    T = nll.shape[-1]
    idx = torch.arange(T, device=nll.device)
    expo = (idx.unsqueeze(0) - idx.unsqueeze(1)).to(nll.dtype)  # [t, k] = k - t
    disc = torch.where(expo >= 0, gamma ** expo.clamp(min=0), 0.0)
    L = m.sum(-1, keepdim=True).clamp(min=1)
    w = ((nll * m) @ disc.T) / L * m
    return w * L / w.sum(-1, keepdim=True).clamp(min=1e-12)


def ift(logp, old_logp, ref_logp, adv, mask, cfg, norm: StepNorm, **batch) -> tuple[Tensor, Metrics]:
    """IFT (Hua et al. 2024, arXiv 2405.16509; TsinghuaC3I/Intuitive-Fine-Tuning `ift`). [CODE]

    `logp` comes from the temporal-residual forward (inputs (1 - lambda) E(y_t) + lambda E(ŷ_t), ŷ the
    model's own greedy prediction; `forward_options`). With l_t = -log p_t and w = `ift_weights`:
    loss_i = A_i (1 / L_i) sum_t w_t l_t, mean over sequences (A = 1 on demonstrations).
    """
    lp = _f32(logp)
    nll = -lp * mask.to(lp.dtype)
    w = ift_weights(nll, mask, cfg.ift_gamma)
    L = mask.to(lp.dtype).sum(-1).clamp(min=1)
    per_seq = adv.to(lp) * (w * nll).sum(-1) / L
    return per_seq.sum() / max(norm.num_seqs, 1.0), {"ift_weight_max": (w.detach().amax(-1)).sum() / max(norm.num_seqs, 1.0)}


# what the config check (shared.config) and the loop read from each objective
for _fn in (nft, copg, dpo, modpo):
    _fn.needs_whole_groups = True
for _fn in (copg, dpo, modpo, asft):
    _fn.needs_reference = True  # beta > 0 is their temperature or KL weight
alol.uses_reference = True  # pi_ref ratios and the value head's prompt states, whatever beta is
asft.forward_options = lambda cfg: {"vocab_kl": True}
ift.forward_options = lambda cfg: {"residual_lambda": cfg.ift_lambda}

OBJECTIVES.update({"nft": nft, "copg": copg, "dpo": dpo, "modpo": modpo, "alol": alol, "sft": sft, "dft": dft,
                   "asft": asft, "ift": ift})
