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

Flow matching, SDE sampling (Flow-GRPO, Liu et al. 2505.05470, METHODS.md D.1): the model predicts the
velocity v of x_s = (1 - s) x_0 + s noise (s = sigma, 1 = pure noise, timestep = 1000 s). The ODE
dx = v ds is turned into the SDE with the same marginals, and one Euler-Maruyama step from s to
s' < s (ds = s' - s < 0) is Gaussian:

    std_s  = a * sqrt(s / (1 - s))             (a = eta, 0.7 in the paper; s = 1 uses s = sigmas[1]
                                                 in the denominator, as the authors' code does)
    mean   = x + [v + std_s^2 / (2 s) (x + (1 - s) v)] ds
    std    = std_s * sqrt(-ds)

With a = 0 it is the plain Euler step x + v ds of diffusers' FlowMatchEulerDiscreteScheduler.

A step kind (`StepKind` in `STEPS`) names the diffusers scheduler that lays out its timesteps, how to
read its `schedule` from that scheduler, and its Gaussian mean/std; `gaussian_step` samples or scores
any of them, so the policy and the loop do not change with the kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

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


@dataclass(frozen=True)
class FlowSchedule:
    """What a flow-matching step needs: the sigma grid (descending, ending at 0) and its timesteps."""

    sigmas: Tensor  # [S + 1], float64, sigmas[-1] = 0
    timesteps: Tensor  # [S], float64: the model's timestep input at each sigma (sigma * num_train_timesteps)

    @staticmethod
    def from_scheduler(scheduler) -> "FlowSchedule":
        """From a diffusers FlowMatchEulerDiscreteScheduler after `set_timesteps` (its shift included)."""
        return FlowSchedule(scheduler.sigmas.double().cpu(), scheduler.timesteps.double().cpu())

    def sigmas_at(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(s, s_next) per sample for timesteps t [N] taken from `timesteps`."""
        idx = (self.timesteps.to(t.device)[None, :] - t.double()[:, None]).abs().argmin(dim=1)
        sig = self.sigmas.to(t.device)
        return sig[idx], sig[idx + 1]


def flow_mean_std(v: Tensor, x_t: Tensor, t: Tensor, schedule: FlowSchedule, eta: float) -> tuple[Tensor, Tensor]:
    """Mean [N, ...] and std [N] of the Flow-GRPO SDE step from sigma(t) to the next sigma (float32)."""
    s, s_next = schedule.sigmas_at(t)
    ds = s_next - s  # < 0: sampling runs from noise (s = 1) to data (s = 0)
    s_den = torch.where(s >= 1, schedule.sigmas[1].to(s), s)  # the authors' guard against 1 / (1 - 1)
    std_s = eta * (s / (1 - s_den)).sqrt()
    v, x = v.float(), x_t.float()
    drift = v + _bcast(std_s**2 / (2 * s), x) * (x + _bcast(1 - s, x) * v)
    return x + _bcast(ds, x) * drift, (std_s * (-ds).sqrt()).float()


def gaussian_step(mean_std: Callable, out: Tensor, x_t: Tensor, t: Tensor, schedule: Any, eta: float,
                  noise: Tensor | None = None, x_prev: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """One step of any Gaussian step kind: (x_next, log p(x_next | x_t) [N] or None when eta == 0).

    `out` is the model's (guided) prediction: noise for DDIM, velocity for flow matching. Give `noise`
    to sample (x_next = mean + std * noise) or `x_prev` to score a stored transition.
    """
    mean, std = mean_std(out, x_t, t, schedule, eta)
    if x_prev is None:
        x_prev = mean if eta == 0 or noise is None else mean + _bcast(std, mean) * noise.float()
    logp = gaussian_log_prob(x_prev, mean, std) if eta > 0 else None
    return x_prev.to(x_t.dtype), logp


def step_kl(mean_a: Tensor, mean_b: Tensor, std: Tensor) -> Tensor:
    """KL between two Gaussian steps with the same std, averaged over latent dims like the log-probs: [N]."""
    d = (mean_a.float() - mean_b.float()) ** 2 / (2 * _bcast(std, mean_a) ** 2)
    return d.mean(dim=tuple(range(1, mean_a.dim())))


ddim_step = partial(gaussian_step, ddim_mean_std)
flow_sde_step = partial(gaussian_step, flow_mean_std)


@dataclass(frozen=True)
class StepKind:
    """A denoising step kind: the diffusers scheduler that sets its timesteps, the schedule read from it,
    its Gaussian mean/std, and the dtype of the timesteps the model is called with."""

    scheduler: str
    schedule: Callable[[Any], Any]
    mean_std: Callable[..., tuple[Tensor, Tensor]]
    timestep_dtype: torch.dtype

    def step(self, out: Tensor, x_t: Tensor, t: Tensor, schedule: Any, eta: float, noise: Tensor | None = None,
             x_prev: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        return gaussian_step(self.mean_std, out, x_t, t, schedule, eta, noise=noise, x_prev=x_prev)


STEPS = {
    "ddim": StepKind("DDIMScheduler", Schedule.from_scheduler, ddim_mean_std, torch.long),
    "flow_sde": StepKind("FlowMatchEulerDiscreteScheduler", FlowSchedule.from_scheduler, flow_mean_std,
                         torch.float32),
}
