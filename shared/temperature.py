"""AceReason's temperature rule (arXiv 2506.13284, METHODS.md B.23) [PAPER/APPROX].

Choose the RL sampling temperature T so that the temperature-adjusted token entropy at the start of
training is about a target (the paper: 0.3; lower under-explores, higher destabilises). Our reading of
the definition: the mean token entropy of the sampling distribution softmax(z / T), over answers
sampled at T for a probe batch of training prompts. `choose_temperature` sweeps candidate
temperatures and keeps the one whose entropy is closest to the target.
"""

from __future__ import annotations

import torch


def set_temperature(policy, temperature: float) -> None:
    """Sampling and log-prob temperature of a token policy (both must agree)."""
    module = policy.unwrap(policy.module)
    if not hasattr(policy, "temperature") or not hasattr(module, "temperature"):
        raise ValueError("rollout.target_entropy needs a token policy with a sampling temperature")
    policy.temperature = module.temperature = float(temperature)


@torch.no_grad()
def probe_entropy(policy, rows: list[dict], temperature: float, n: int, seed: int) -> float:
    """Mean token entropy of softmax(z / T) over n answers per row sampled at T."""
    set_temperature(policy, temperature)
    batch = policy.sample(rows, n, seed=seed, first_sample_id=0, first_group_id=0)
    _, entropy = policy.log_probs(batch, with_entropy=True)[:2]
    mask = batch.mask.to(entropy.dtype)
    return float((entropy * mask).sum() / mask.sum().clamp(min=1))


def choose_temperature(policy, rows: list[dict], target: float, candidates: list[float], n: int = 4,
                       seed: int = 0) -> dict:
    """Set the policy's temperature to the candidate whose probe entropy is closest to `target`;
    returns {"temperature", "target_entropy", "probe": [{"temperature", "entropy"}, ...]}."""
    if not candidates:
        raise ValueError("rollout.temperature_candidates is empty")
    probe = [{"temperature": float(t), "entropy": probe_entropy(policy, rows, t, n, seed)} for t in candidates]
    best = min(probe, key=lambda p: abs(p["entropy"] - target))
    set_temperature(policy, best["temperature"])
    return {"temperature": best["temperature"], "target_entropy": target, "probe": probe}
