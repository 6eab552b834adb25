"""RLG (diffusion_rl/guidance.py; METHODS.md D.4) on a tiny in-process pipeline: end points exact, linearity,
w schedule, LoRA reference, sweep outputs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion_rl  # noqa: F401  (registers color_area)
from diffusion_rl.embedded import build_pipeline
from diffusion_rl.guidance import grid, guided_sample, rlg_eps, sweep, w_at
from diffusion_rl.policy import EVAL_SEED, DiffusionPolicy
from shared.config import RewardSpec
from shared.rewards import CombinedReward

WORDS = ["a", "red", "green", "circle", "square"]
ROWS = [
    {"prompt": "a red circle", "seed": 0, "rgb": [220, 40, 40]},
    {"prompt": "a green square", "seed": 5, "rgb": [40, 170, 60]},
    {"prompt": "a red square", "seed": 12, "rgb": [220, 40, 40]},
]


def make_pipe(seed=0):
    torch.manual_seed(seed)
    return build_pipeline(WORDS, image_size=16, unet_channels=(16, 32), text_dim=16)


def make_policy(pipe, unet=None):
    return DiffusionPolicy(pipe, unet=unet, num_steps=4, guidance_scale=2.0, eta=1.0, eval_eta=0.0)


@pytest.fixture(scope="module")
def policy():
    """Full-weight policy whose UNet was perturbed after the (deep-copied) reference was frozen."""
    pol = make_policy(make_pipe(0))
    pol.build_reference()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pol.module.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return pol


@pytest.fixture(scope="module")
def lora():
    """(policy, peft UNet) with only the lora_B weights perturbed (so the adapter changes the model)."""
    from peft import LoraConfig, get_peft_model

    pipe = make_pipe(2)
    peft_unet = get_peft_model(pipe.unet, LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pol = make_policy(pipe, unet=peft_unet)
    pol.build_reference()  # a no-op with LoRA: the reference is the adapter disabled
    g = torch.Generator().manual_seed(3)
    n = 0
    with torch.no_grad():
        for name, p in peft_unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
                n += 1
    assert n > 0
    return pol, peft_unet


def inputs(pol, rows):
    """Noise, cond and uncond exactly as guided_sample builds them."""
    noise = pol.noise(EVAL_SEED, [int(r["seed"]) for r in rows])
    cond = pol.encode_prompts([r["prompt"] for r in rows])
    uncond = pol.encode_prompts([""]).expand_as(cond).contiguous()
    return noise, cond, uncond


def run(pol, eps_fn, rows=ROWS):
    """(final latents, images as uint8 arrays) of the deterministic evaluation sampler with eps_fn."""
    noise, cond, uncond = inputs(pol, rows)
    x0 = pol.denoise(eps_fn, noise, cond, uncond, pol.eval_eta)
    return x0, arrays(pol.decode(x0))


def arrays(images):
    return np.stack([np.asarray(im) for im in images])


def rlg_latents(pol, w, w_end=None, rows=ROWS):
    noise, cond, uncond = inputs(pol, rows)
    return pol.denoise(rlg_eps(pol, w, w_end), noise, cond, uncond, pol.eval_eta)


# ------------------------------------------------------------------------------------------------
# End points and interpolation (full-weight RL model + frozen copy)
# ------------------------------------------------------------------------------------------------


def test_reference_is_frozen_copy(policy):
    ref = policy._reference
    assert ref is not None and ref is not policy.module
    assert not any(p.requires_grad for p in ref.parameters())
    diff = [not torch.equal(a, b) for a, b in zip(ref.model.parameters(), policy.module.model.parameters())]
    assert all(diff)  # every weight was perturbed in the RL model only


def test_w0_reproduces_base_exactly(policy):
    with policy.reference() as ref:
        x_base, img_base = run(policy, ref)
    img_rlg = arrays(guided_sample(policy, ROWS, 0.0))
    assert img_rlg.dtype == np.uint8 and img_rlg.shape == (3, 16, 16, 3)
    assert np.array_equal(img_rlg, img_base)
    assert torch.equal(rlg_latents(policy, 0.0), x_base)


def test_w1_reproduces_rl_model_exactly(policy):
    x_rl, img_rl = run(policy, policy.unwrap(policy.module))
    assert np.array_equal(arrays(guided_sample(policy, ROWS, 1.0)), img_rl)
    assert torch.equal(rlg_latents(policy, 1.0), x_rl)
    # ... which are also the held-out report's evaluation images (same seeds, eval_eta)
    report = policy.complete(ROWS)
    assert np.array_equal(arrays([r["image"] for r in report]), img_rl)


def test_base_and_rl_differ_and_interpolation_differs_from_both(policy):
    with policy.reference() as ref:
        x_base, img_base = run(policy, ref)
    x_rl, img_rl = run(policy, policy.unwrap(policy.module))
    x_half = rlg_latents(policy, 0.5)
    img_half = arrays(guided_sample(policy, ROWS, 0.5))
    assert not torch.allclose(x_base, x_rl, atol=1e-3)
    for other, img_other in ((x_base, img_base), (x_rl, img_rl)):
        assert not torch.allclose(x_half, other, atol=1e-3)
        assert not np.array_equal(img_half, img_other)
    assert not np.array_equal(img_base, img_rl)


@pytest.mark.parametrize("w", [0.5, 2.0, -0.5])
def test_eps_is_linear_combination(policy, w):
    noise, cond, uncond = inputs(policy, ROWS)
    x = noise[:, 0]
    for t_val in policy.scheduler.timesteps.tolist()[:2]:
        t = torch.full((x.shape[0],), t_val, dtype=torch.long)
        with torch.no_grad():
            with policy.reference() as ref:
                e_ref = ref(x, t, cond, uncond)
            e_rl = policy.unwrap(policy.module)(x, t, cond, uncond)
            got = rlg_eps(policy, w)(x, t, cond, uncond)
        assert not torch.allclose(e_ref, e_rl, atol=1e-3)
        torch.testing.assert_close(got, e_ref + w * (e_rl - e_ref), rtol=1e-5, atol=1e-5)


def test_eps_follows_w_schedule(policy):
    """Linear schedule 0 -> 3 over 4 steps: weights 0, 1, 2, 3 at the four timesteps."""
    noise, cond, uncond = inputs(policy, ROWS[:2])
    x = noise[:, 0]
    fn = rlg_eps(policy, 0.0, w_end=3.0)
    for s, t_val in enumerate(policy.scheduler.timesteps.tolist()):
        t = torch.full((x.shape[0],), t_val, dtype=torch.long)
        with torch.no_grad():
            with policy.reference() as ref:
                e_ref = ref(x, t, cond, uncond)
            e_rl = policy.unwrap(policy.module)(x, t, cond, uncond)
            got = fn(x, t, cond, uncond)
        if s == 0:
            assert torch.equal(got, e_ref)
        elif s == 1:
            assert torch.equal(got, e_rl)
        torch.testing.assert_close(got, e_ref + float(s) * (e_rl - e_ref), rtol=1e-5, atol=1e-5)


def test_flat_schedule_equals_constant_w(policy):
    assert torch.equal(rlg_latents(policy, 0.7, w_end=0.7), rlg_latents(policy, 0.7))
    assert not torch.equal(rlg_latents(policy, 0.7, w_end=1.5), rlg_latents(policy, 0.7))


# ------------------------------------------------------------------------------------------------
# w schedule
# ------------------------------------------------------------------------------------------------


def test_w_at_constant():
    assert [w_at(s, 5, 1.5) for s in range(5)] == [1.5] * 5
    assert isinstance(w_at(0, 5, 2), float)


def test_w_at_linear():
    ws = [w_at(s, 4, 1.0, 4.0) for s in range(4)]
    assert ws[0] == 1.0 and ws[-1] == 4.0
    assert ws == pytest.approx([1.0, 2.0, 3.0, 4.0])
    down = [w_at(s, 3, 2.0, 0.0) for s in range(3)]
    assert down == pytest.approx([2.0, 1.0, 0.0]) and down[-1] == 0.0


def test_w_at_single_step():
    assert w_at(0, 1, 2.0) == 2.0
    assert w_at(0, 1, 2.0, 5.0) == 2.0  # one step: the start weight


# ------------------------------------------------------------------------------------------------
# LoRA: the reference is the same UNet with the adapter disabled
# ------------------------------------------------------------------------------------------------


def test_lora_reference_is_adapter_disabled(lora):
    pol, _ = lora
    assert pol._reference is None
    with pol.reference() as ref:
        assert ref is pol.unwrap(pol.module)


def test_lora_w0_is_adapter_disabled_w1_enabled(lora):
    pol, peft_unet = lora
    with peft_unet.disable_adapter():
        x_off, img_off = run(pol, pol.module)
    x_on, img_on = run(pol, pol.module)
    assert not torch.allclose(x_off, x_on, atol=1e-3)
    assert not np.array_equal(img_off, img_on)

    assert np.array_equal(arrays(guided_sample(pol, ROWS, 0.0)), img_off)
    assert torch.equal(rlg_latents(pol, 0.0), x_off)
    assert np.array_equal(arrays(guided_sample(pol, ROWS, 1.0)), img_on)
    assert torch.equal(rlg_latents(pol, 1.0), x_on)
    # the adapter is enabled again after guided sampling
    x_again, _ = run(pol, pol.module)
    assert torch.equal(x_again, x_on)


def test_lora_eps_linear_combination(lora):
    pol, peft_unet = lora
    noise, cond, uncond = inputs(pol, ROWS)
    x, t = noise[:, 0], torch.full((len(ROWS),), int(pol.scheduler.timesteps[0]), dtype=torch.long)
    with torch.no_grad():
        with peft_unet.disable_adapter():
            e_ref = pol.module(x, t, cond, uncond)
        e_rl = pol.module(x, t, cond, uncond)
        got = rlg_eps(pol, 2.0)(x, t, cond, uncond)
    torch.testing.assert_close(got, e_ref + 2.0 * (e_rl - e_ref), rtol=1e-5, atol=1e-5)


def test_lora_dropout_w1_is_the_eval_model():
    from peft import LoraConfig, get_peft_model

    pipe = make_pipe(4)
    peft_unet = get_peft_model(pipe.unet, LoraConfig(r=4, lora_alpha=4, lora_dropout=0.5,
                                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pol = make_policy(pipe, unet=peft_unet)
    with torch.no_grad():
        for name, p in peft_unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    evaluated = arrays([r["image"] for r in pol.complete(ROWS)])  # complete() samples in eval mode
    assert np.array_equal(arrays(guided_sample(pol, ROWS, 1.0)), evaluated)


# ------------------------------------------------------------------------------------------------
# Sweep outputs
# ------------------------------------------------------------------------------------------------


def test_sweep_writes_outputs(policy, tmp_path):
    # the untrained tiny pipeline draws brownish images: target that colour with a tight threshold so the
    # rewards are fractions strictly between 0 and 1 (a check on all-zero rewards would prove nothing)
    reward = CombinedReward.from_specs([RewardSpec(name="color_area", kwargs={"field": "rgb", "threshold": 0.08})])
    rows = [dict(r, rgb=[140, 116, 92]) for r in ROWS]
    ws = [0, 1, 2]
    out = tmp_path / "rlg"
    result = sweep(policy, rows, reward, ws=ws, out_dir=out)

    saved = json.loads((out / "rlg.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["ws"] == ws and saved["w_end"] is None
    assert saved["prompts"] == [r["prompt"] for r in rows] and saved["seeds"] == [r["seed"] for r in rows]
    assert len(saved["mean_reward"]) == 3 and len(saved["rewards"]) == 3
    fields = {"prompt": [r["prompt"] for r in rows], "seed": [r["seed"] for r in rows], "rgb": [r["rgb"] for r in rows]}
    for i, w in enumerate(ws):
        scores = reward(guided_sample(policy, rows, w), fields).total
        assert saved["rewards"][i] == pytest.approx(scores.tolist(), abs=1e-6)
        assert saved["mean_reward"][i] == pytest.approx(float(scores.double().mean()), abs=1e-6)
        assert all(0.0 <= s <= 1.0 for s in saved["rewards"][i])
    flat = [s for row in saved["rewards"] for s in row]
    assert any(0.0 < s < 1.0 for s in flat) and len(set(flat)) > 1
    assert len(set(saved["mean_reward"])) > 1  # w changes the images, hence the rewards

    with Image.open(out / "grid.png") as im:
        # label column 110 px + one 96 px cell per w; a 14 px header + (96 + 14) px per prompt row
        assert im.size == (110 + 96 * len(ws), 14 + (96 + 14) * len(rows))
    with Image.open(out / "reward_vs_w.png") as im:
        assert im.size == (450, 320)


def test_grid_size_and_pick():
    images = {w: [Image.new("RGB", (16, 16), (w * 50, 0, 0)) for _ in range(2)] for w in (0, 1)}
    scores = {w: [0.1, 0.2] for w in (0, 1)}
    g = grid(images, scores, [0, 1], [1], ["p"], cell=32)
    assert g.size == (110 + 2 * 32, 14 + 32 + 14)
    # the cell of row 0 (image index 1), column w=1 holds the w=1 image, resized
    assert g.getpixel((110 + 32 + 10, 14 + 10)) == (50, 0, 0)
