"""DDIM step with log-probability (diffusion_rl/steps.py; METHODS.md D.1) against diffusers and by hand."""

import math

import pytest
import torch

from diffusion_rl.embedded import build_scheduler
from diffusion_rl.steps import STEPS, Schedule, ddim_mean_std, ddim_step, gaussian_log_prob, step_kl

SHAPE = (4, 6, 6)  # latent [C, H, W]


@pytest.fixture(scope="module")
def sched():
    s = build_scheduler()
    s.set_timesteps(10)
    return s


@pytest.fixture(scope="module")
def schedule(sched):
    return Schedule.from_scheduler(sched)


def tensors(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, *SHAPE, generator=g)
    x_t = torch.randn(n, *SHAPE, generator=g)
    noise = torch.randn(n, *SHAPE, generator=g)
    return eps, x_t, noise


def reference_mean_std(eps, x_t, t, sched, eta):
    """D.1 by hand in float64, per sample:
        a_t = alphas_cumprod[t], a_prev = alphas_cumprod[t - 100] (or final_alpha_cumprod when t - 100 < 0)
        x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
        std    = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
        mean   = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - std^2) eps
    """
    ac = sched.alphas_cumprod.double()
    means, stds = [], []
    for i, ti in enumerate(t.tolist()):
        a_t = float(ac[ti])
        prev = ti - 1000 // 10
        a_prev = float(ac[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
        e, x = eps[i].double(), x_t[i].double()
        x0 = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
        std = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        means.append(math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * e)
        stds.append(std)
    return torch.stack(means), torch.tensor(stds, dtype=torch.float64)


def reference_log_prob(x, mean, std):
    """mean over latent dims of -(x - mean)^2 / (2 std^2) - log std - log sqrt(2 pi), float64."""
    x, mean = x.double(), mean.double()
    s = std.double().view(-1, 1, 1, 1)
    lp = -((x - mean) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=(1, 2, 3))


# ------------------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------------------


def test_schedule_from_scheduler(sched, schedule):
    assert schedule.step_ratio == 100
    assert sched.timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert schedule.alphas_cumprod.dtype == torch.float64
    assert schedule.final_alpha_cumprod == pytest.approx(float(sched.alphas_cumprod[0]))  # set_alpha_to_one=False
    a_t, a_prev = schedule.alphas(torch.tensor([901, 101, 1]))
    ac = sched.alphas_cumprod.double()
    assert torch.allclose(a_t, ac[[901, 101, 1]])
    assert torch.allclose(a_prev, torch.stack([ac[801], ac[1], ac[0]]))


def test_schedule_step_ratio_other_counts():
    s = build_scheduler()
    s.set_timesteps(4)
    assert Schedule.from_scheduler(s).step_ratio == 250
    s.set_timesteps(50)
    assert Schedule.from_scheduler(s).step_ratio == 20


def test_registered():
    eps, x_t, noise = tensors(2)
    t = torch.full((2,), 501)
    s = build_scheduler()
    s.set_timesteps(10)
    kind = STEPS["ddim"]
    assert kind.scheduler == "DDIMScheduler" and kind.timestep_dtype == torch.long
    a = kind.step(eps, x_t, t, kind.schedule(s), 1.0, noise=noise)
    b = ddim_step(eps, x_t, t, Schedule.from_scheduler(s), 1.0, noise=noise)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------------------------
# Sampling matches diffusers' DDIMScheduler.step
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("t", [901, 501, 101, 1])
def test_matches_diffusers_step(sched, schedule, eta, t):
    eps, x_t, noise = tensors(3, seed=t)
    ours, logp = ddim_step(eps, x_t, torch.full((3,), t), schedule, eta, noise=noise)
    theirs = sched.step(eps, t, x_t, eta=eta, variance_noise=noise).prev_sample
    assert ours.dtype == x_t.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (logp is None) == (eta == 0)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_per_sample_timesteps_match_diffusers(sched, schedule, eta):
    ts = sched.timesteps.tolist()  # every timestep, including the last (prev < 0 -> final_alpha_cumprod)
    n = len(ts)
    eps, x_t, noise = tensors(n, seed=11)
    t = torch.tensor(ts[::-1])  # each sample at a different timestep, in no particular order
    ours, logp = ddim_step(eps, x_t, t, schedule, eta, noise=noise)
    assert logp.shape == (n,)
    for i, ti in enumerate(t.tolist()):
        theirs = sched.step(eps[i:i + 1], ti, x_t[i:i + 1], eta=eta, variance_noise=noise[i:i + 1]).prev_sample
        torch.testing.assert_close(ours[i:i + 1], theirs, rtol=1e-5, atol=1e-5)
    # and one sample alone gives the same step as inside the mixed batch
    alone, lp_alone = ddim_step(eps[3:4], x_t[3:4], t[3:4], schedule, eta, noise=noise[3:4])
    torch.testing.assert_close(alone, ours[3:4], rtol=0, atol=0)
    torch.testing.assert_close(lp_alone, logp[3:4], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Mean, std and log-prob by hand
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_mean_std_by_hand(sched, schedule, eta):
    eps, x_t, _ = tensors(5, seed=3)
    t = torch.tensor([901, 601, 301, 101, 1])
    mean, std = ddim_mean_std(eps, x_t, t, schedule, eta)
    ref_mean, ref_std = reference_mean_std(eps, x_t, t, sched, eta)
    assert mean.dtype == std.dtype == torch.float32 and std.shape == (5,)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.double(), ref_std, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_log_prob_by_hand(sched, schedule, eta):
    eps, x_t, noise = tensors(5, seed=4)
    t = torch.tensor([901, 601, 301, 101, 1])
    x_prev, logp = ddim_step(eps, x_t, t, schedule, eta, noise=noise)
    ref_mean, ref_std = reference_mean_std(eps, x_t, t, sched, eta)
    ref_lp = reference_log_prob(x_prev, ref_mean, ref_std)
    assert logp.shape == (5,) and logp.dtype == torch.float32
    # x_prev = mean + std * noise, so the quadratic term is ~ noise^2 / 2; tolerance relative to |log p|
    torch.testing.assert_close(logp.double(), ref_lp, rtol=1e-4, atol=1e-4)
    # the sampled transition's log-prob is -noise^2/2 - log std - log sqrt(2 pi), averaged over dims
    direct = (-(noise.double() ** 2) / 2).mean(dim=(1, 2, 3)) - torch.log(ref_std) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(logp.double(), direct, rtol=1e-3, atol=1e-3)


def test_gaussian_log_prob_matches_torch_normal():
    g = torch.Generator().manual_seed(5)
    x, mean = torch.randn(4, *SHAPE, generator=g), torch.randn(4, *SHAPE, generator=g)
    std = torch.tensor([0.05, 0.3, 1.0, 2.5])
    ours = gaussian_log_prob(x, mean, std)
    normal = torch.distributions.Normal(mean, std.view(-1, 1, 1, 1).expand_as(mean))
    ref = normal.log_prob(x).mean(dim=(1, 2, 3))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours.shape == (4,)


# ------------------------------------------------------------------------------------------------
# Scoring stored transitions, eta = 0
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_scoring_stored_transition_equals_sampling_logp(schedule, eta):
    eps, x_t, noise = tensors(6, seed=6)
    t = torch.tensor([901, 701, 501, 301, 101, 1])
    x_prev, lp_sample = ddim_step(eps, x_t, t, schedule, eta, noise=noise)
    x_same, lp_score = ddim_step(eps, x_t, t, schedule, eta, x_prev=x_prev)
    assert torch.equal(x_same, x_prev)
    torch.testing.assert_close(lp_score, lp_sample, rtol=0, atol=0)
    # a different model output scores the same transition lower on average (it is not the sampler)
    _, lp_other = ddim_step(eps + 0.5, x_t, t, schedule, eta, x_prev=x_prev)
    assert (lp_other < lp_score).all()


def test_eta_zero_is_deterministic_mean_without_logp(sched, schedule):
    eps, x_t, noise = tensors(4, seed=7)
    t = torch.tensor([901, 501, 101, 1])
    x_prev, logp = ddim_step(eps, x_t, t, schedule, 0.0, noise=noise)
    assert logp is None
    mean, std = ddim_mean_std(eps, x_t, t, schedule, 0.0)
    assert torch.equal(std, torch.zeros(4))
    assert torch.equal(x_prev, mean)
    no_noise, _ = ddim_step(eps, x_t, t, schedule, 0.0)
    assert torch.equal(no_noise, x_prev)
    ref_mean, _ = reference_mean_std(eps, x_t, t, sched, 0.0)
    torch.testing.assert_close(x_prev.double(), ref_mean, rtol=1e-5, atol=1e-5)


def test_no_noise_with_eta_returns_mean(schedule):
    eps, x_t, _ = tensors(2, seed=8)
    t = torch.tensor([801, 201])
    x_prev, logp = ddim_step(eps, x_t, t, schedule, 1.0)
    mean, std = ddim_mean_std(eps, x_t, t, schedule, 1.0)
    assert torch.equal(x_prev, mean)
    torch.testing.assert_close(logp, -torch.log(std) - 0.5 * math.log(2 * math.pi))


def test_dtype_preserved(schedule):
    eps, x_t, noise = tensors(2, seed=9)
    t = torch.tensor([501, 1])
    x_prev, logp = ddim_step(eps.half(), x_t.half(), t, schedule, 1.0, noise=noise)
    assert x_prev.dtype == torch.float16 and logp.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# KL between steps
# ------------------------------------------------------------------------------------------------


def test_step_kl_matches_torch_distributions(schedule):
    g = torch.Generator().manual_seed(10)
    a, b = torch.randn(3, *SHAPE, generator=g), torch.randn(3, *SHAPE, generator=g)
    std = torch.tensor([0.1, 0.7, 1.3])
    s = std.view(-1, 1, 1, 1).expand_as(a)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(a, s), torch.distributions.Normal(b, s))
    ours = step_kl(a, b, std)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, ref.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)
    assert torch.equal(step_kl(a, a.clone(), std), torch.zeros(3))
    assert (ours > 0).all()


def test_step_kl_of_two_ddim_steps(schedule):
    """Two model outputs at the same x_t give steps with the same std; their KL is the Normal-Normal KL."""
    eps, x_t, _ = tensors(2, seed=12)
    t = torch.tensor([701, 301])
    m1, std = ddim_mean_std(eps, x_t, t, schedule, 1.0)
    m2, std2 = ddim_mean_std(eps + 0.1, x_t, t, schedule, 1.0)
    assert torch.equal(std, std2)
    s = std.view(-1, 1, 1, 1).expand_as(m1)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, s), torch.distributions.Normal(m2, s))
    torch.testing.assert_close(step_kl(m1, m2, std), ref.mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-6)
