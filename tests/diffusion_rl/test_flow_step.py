"""Flow-GRPO's SDE step (diffusion_rl/steps.py; METHODS.md D.1) by hand, against diffusers' Euler step, and
on a flow whose exact velocity is known (the SDE must keep the marginals of x_s = (1 - s) c + s noise)."""

import math

import pytest
import torch

from diffusion_rl.embedded import build_scheduler
from diffusion_rl.steps import STEPS, FlowSchedule, flow_mean_std, flow_sde_step, gaussian_log_prob, step_kl

SHAPE = (2, 3, 3)


@pytest.fixture(scope="module")
def sched():
    s = build_scheduler("flow_sde")
    s.set_timesteps(10)
    return s


@pytest.fixture(scope="module")
def schedule(sched):
    return FlowSchedule.from_scheduler(sched)


def tensors(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *SHAPE, generator=g) for _ in range(3)]


HAND = FlowSchedule(torch.tensor([1.0, 0.7, 0.6, 0.0], dtype=torch.float64),
                    torch.tensor([1000.0, 700.0, 600.0], dtype=torch.float64))


def test_schedule_reads_the_flow_scheduler(sched, schedule):
    """diffusers' grid: timesteps linspace(1000, 1, 10), sigma = timestep / 1000, then a final 0."""
    assert len(schedule.sigmas) == 11 and schedule.sigmas[0] == 1.0 and schedule.sigmas[-1] == 0.0
    s, s_next = schedule.sigmas_at(sched.timesteps[[0, 3, 9]].float())
    torch.testing.assert_close(s, torch.tensor([1.0, 0.667, 0.001], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(s_next, torch.tensor([0.889, 0.556, 0.0], dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("index", [0, 4, 9])
def test_noise_free_step_is_diffusers_euler_step(sched, schedule, index):
    v, x, _ = tensors(3, seed=index)
    t = sched.timesteps[index]
    ours, logp = flow_sde_step(v, x, t.repeat(3).float(), schedule, 0.0)
    sched._step_index = None  # diffusers keeps a step counter; start it at this timestep
    theirs = sched.step(v, t, x).prev_sample
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert logp is None


def test_mean_and_std_by_hand():
    """s = 0.7, s' = 0.6, a = 0.7, one latent value x = 0.5 with velocity v = -1.2:
        std_s = 0.7 sqrt(0.7 / 0.3)                     = 1.069268...
        mean  = x + [v + std_s^2 / (2 s) (x + (1 - s) v)] (s' - s)
              = 0.5 + [-1.2 + 1.143333 / 1.4 (0.5 - 0.36)] (-0.1) = 0.5 + [-1.2 + 0.114333] (-0.1) = 0.608567
        std   = std_s sqrt(0.1)                          = 0.338132...
    """
    mean, std = flow_mean_std(torch.full((1, 1), -1.2), torch.full((1, 1), 0.5), torch.tensor([700.0]), HAND, 0.7)
    std_s = 0.7 * math.sqrt(0.7 / 0.3)
    expect = 0.5 + (-1.2 + std_s**2 / 1.4 * (0.5 + 0.3 * -1.2)) * -0.1
    assert mean.item() == pytest.approx(expect, rel=1e-5) and expect == pytest.approx(0.608567, abs=1e-6)
    assert std.item() == pytest.approx(std_s * math.sqrt(0.1), rel=1e-5)


def test_first_step_uses_the_authors_guard():
    """At s = 1, 1 / (1 - s) is replaced by 1 / (1 - sigmas[1]): std_s = a sqrt(1 / (1 - 0.7)), std = std_s sqrt(0.3)."""
    v, x, noise = tensors(2)
    mean, std = flow_mean_std(v, x, torch.tensor([1000.0, 1000.0]), HAND, 0.7)
    assert torch.isfinite(mean).all()
    torch.testing.assert_close(std, torch.full((2,), 0.7 * math.sqrt(1 / 0.3) * math.sqrt(0.3)))


def test_log_prob_is_the_gaussian_of_the_step_and_scoring_reproduces_sampling(sched, schedule):
    v, x, noise = tensors(4, seed=3)
    t = sched.timesteps[[1, 2, 5, 8]].float()
    x_next, logp = flow_sde_step(v, x, t, schedule, 0.7, noise=noise)
    mean, std = flow_mean_std(v, x, t, schedule, 0.7)
    torch.testing.assert_close(x_next, mean + std.view(-1, 1, 1, 1) * noise)
    by_hand = (-(noise**2) / 2 - torch.log(std).view(-1, 1, 1, 1) - 0.5 * math.log(2 * math.pi)).mean((1, 2, 3))
    torch.testing.assert_close(logp, by_hand, atol=1e-5, rtol=1e-5)
    _, again = flow_sde_step(v, x, t, schedule, 0.7, x_prev=x_next)
    torch.testing.assert_close(again, logp)
    _, other = flow_sde_step(v + 0.3, x, t, schedule, 0.7, x_prev=x_next)
    assert (other < logp).all()
    torch.testing.assert_close(gaussian_log_prob(x_next, mean, std), logp)


def test_step_kl_is_flow_grpo_closed_form(sched, schedule):
    """KL between two policies' steps = ||mu_theta - mu_ref||^2 / (2 std_s^2 |ds|), averaged over latent dims."""
    v, x, _ = tensors(3, seed=4)
    t = sched.timesteps[[2, 4, 6]].float()
    m1, std = flow_mean_std(v, x, t, schedule, 0.7)
    m2, _ = flow_mean_std(v + 0.1 * x, x, t, schedule, 0.7)
    s, s_next = schedule.sigmas_at(t)
    var = (0.7**2 * s / (1 - s) * (s - s_next)).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(step_kl(m1, m2, std), ((m1 - m2) ** 2 / (2 * var)).mean((1, 2, 3)))


def test_sde_keeps_the_marginals_of_the_flow():
    """Data = a point c: x_s = (1 - s) c + s noise has the exact velocity v = (x - c) / s. Sampling the SDE
    with that v from pure noise must track mean (1 - s) c and std s at every step (Euler error only),
    as the ODE does; a wrong drift correction would not. Close to s = 0 the step's own noise is as large as
    the marginal's std (Euler-Maruyama's discretisation error), so there only the end point is checked."""
    s = build_scheduler("flow_sde")
    s.set_timesteps(200)
    sch = FlowSchedule.from_scheduler(s)
    c, n = 1.5, 20000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, generator=g)
    for i, t in enumerate(s.timesteps[:-1]):  # the last step would divide by s = 0.001
        sig = sch.sigmas[i].item()
        v = (x - c) / sig
        x, _ = flow_sde_step(v, x, t.repeat(n).float(), sch, 0.7, noise=torch.randn(n, 1, generator=g))
        nxt = sch.sigmas[i + 1].item()
        if nxt >= 0.05:
            assert x.mean().item() == pytest.approx((1 - nxt) * c, abs=0.03)
            assert x.std().item() == pytest.approx(nxt, rel=0.05)  # 1-3% high: the first step's guard, Euler
    assert x.mean().item() == pytest.approx(c, abs=0.01) and x.std().item() < 0.01


def test_registered_kind():
    kind = STEPS["flow_sde"]
    assert kind.scheduler == "FlowMatchEulerDiscreteScheduler" and kind.timestep_dtype == torch.float32
