"""Denoising steps that return their Gaussian log-probability: the "actions" of a diffusion policy.

A step maps (model output, x_t, t) to x_{t-1} ~ N(mean, std^2) and, given x_{t-1}, to
log p(x_{t-1} | x_t). Everything is a pure function of tensors, batched over samples (each sample
may sit at its own timestep), so the policy can sample a trajectory step by step and later
recompute the log-probs of all stored transitions in one flattened batch.

DDIM with eta > 0 (METHODS.md D.1, as in DDPO):

    x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)                    a = alphas_cumprod
    std    = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    mean   = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - std^2) eps
    log p  = mean over latent dims of  -(x_prev - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)

eta = 0 is the deterministic DDIM (ODE) sampler, used for evaluation; it has no log-probability.
Log-probs are AVERAGED over latent dimensions (DDPO's convention), which sets the scale of PRDP's beta.

A new step kind (e.g. Flow-GRPO's flow-matching SDE step, METHODS.md D.1) is one more function
with the same signature registered in `STEPS`; the policy and the loop do not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class Schedule:
    """What a DDIM step needs from the scheduler: cumulative alphas and the step spacing."""

    alphas_cumprod: Tensor  # [num_train_timesteps], float64 for exact arithmetic
    final_alpha_cumprod: float  # a_prev after the last step (SD: alphas_cumprod[0], set_alpha_to_one=False)
    step_ratio: int  # num_train_timesteps // num_inference_steps: prev_t = t - step_ratio

    @staticmethod
    def from_scheduler(scheduler) -> "Schedule":
        """From a diffusers DDIMScheduler after `set_timesteps`."""
        return Schedule(scheduler.alphas_cumprod.double(), float(scheduler.final_alpha_cumprod),
                        scheduler.config.num_train_timesteps // scheduler.num_inference_steps)

    def alphas(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(a_t, a_prev) per sample for integer timesteps t [N]."""
        ac = self.alphas_cumprod.to(t.device)
        prev = t - self.step_ratio
        a_t = ac[t]
        a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.full_like(a_t, self.final_alpha_cumprod))
        return a_t, a_prev


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1))).to(torch.float32)


def ddim_mean_std(eps: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule, eta: float) -> tuple[Tensor, Tensor]:
    """Mean [N, ...] and std [N] of p(x_{t-1} | x_t) for the DDIM step with noise level eta (float32)."""
    a_t, a_prev = schedule.alphas(t)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * var.clamp(min=0).sqrt()
    eps, x_t = eps.float(), x_t.float()
    x0 = (x_t - _bcast((1 - a_t).sqrt(), x_t) * eps) / _bcast(a_t.sqrt(), x_t)
    direction = _bcast((1 - a_prev - std**2).clamp(min=0).sqrt(), x_t) * eps
    return _bcast(a_prev.sqrt(), x_t) * x0 + direction, std.float()


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std^2) averaged over all but the batch dimension -> [N]."""
    s = _bcast(std, x)
    lp = -((x.float() - mean) ** 2) / (2 * s**2) - torch.log(s) - LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, x.dim())))


def ddim_step(eps: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule, eta: float,
              noise: Tensor | None = None, x_prev: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """One DDIM step: (x_{t-1}, log p(x_{t-1} | x_t) [N] or None when eta == 0).

    Give `noise` to sample (x_prev = mean + std * noise) or `x_prev` to score a stored transition.
    """
    mean, std = ddim_mean_std(eps, x_t, t, schedule, eta)
    if x_prev is None:
        x_prev = mean if eta == 0 or noise is None else mean + _bcast(std, mean) * noise.float()
    logp = gaussian_log_prob(x_prev, mean, std) if eta > 0 else None
    return x_prev.to(x_t.dtype), logp


def step_kl(mean_a: Tensor, mean_b: Tensor, std: Tensor) -> Tensor:
    """KL between two Gaussian steps with the same std, averaged over latent dims like the log-probs: [N]."""
    d = (mean_a.float() - mean_b.float()) ** 2 / (2 * _bcast(std, mean_a) ** 2)
    return d.mean(dim=tuple(range(1, mean_a.dim())))


STEPS = {"ddim": ddim_step}
