"""Per-token KL estimators between the policy and the reference (Schulman's k1/k2/k3).

With log r = log pi_ref - log pi_theta (per token, sampled from pi_theta):

| name | estimate of KL(pi_theta || pi_ref)   | notes                                 |
|------|--------------------------------------|---------------------------------------|
| `k1` | -log r = log pi_theta - log pi_ref   | unbiased, high variance, can be < 0   |
| `k2` | (log r)^2 / 2                        | biased, low variance                  |
| `k3` | exp(log r) - log r - 1               | unbiased, >= 0; GRPO's default        |

The log-ratio is clamped to [-clamp, clamp] (10 by default) before exponentiation, as in verl.
"""

from __future__ import annotations

from torch import Tensor


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3", clamp: float = 10.0) -> Tensor:
    log_r = (ref_logp - logp).clamp(-clamp, clamp)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        return log_r.exp() - log_r - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k2 or k3")
