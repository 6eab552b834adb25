"""The diffusion policy on the shared loop: trajectories, log-probs, PRDP / DDPO steps, resume, eval, RLG CLI.

A tiny untrained pipeline of the embedded architecture (16x16 images, 4x4 latents) is built from the
config (`warmup.enabled: false`), so every test exercises the real recipe, loop and checkpoint code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from shared.checkpoint import load_hf_weights
from shared.config import validate_config
from shared.loop import make_accelerator, train
from shared.recipe import build_components
from tests.helpers.tiny import ROOT, merge


def config_dict(tmp_path, **over) -> dict:
    d = {
        "name": "diff", "domain": "diffusion", "seed": 1, "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": "embedded"},
        "task": {"name": "shape_prompts", "image_size": 16, "unet_channels": [16, 32], "text_dim": 16,
                 "num_steps": 4, "guidance_scale": 2.0, "eval_images": 2},
        "warmup": {"enabled": False, "cache_dir": str(tmp_path / "cache")},
        "rewards": [{"name": "color_area", "kwargs": {"field": "rgb", "threshold": 0.5}}],
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 4},
        "algorithm": {"objective": "prdp", "advantage": "none", "beta": 0.01, "prdp_eps": 1e-3, "epochs": 2},
        "optim": {"lr": 1e-3},
        "train": {"steps": 2, "micro_batch_size": 4, "grad_accum_steps": 2},
        "eval": {"every": 0, "max_prompts": 8, "batch_size": 8},
        "checkpoint": {"every": 1, "keep_last": 4},
        "logging": {"progress": False, "tensorboard": False, "plots": False},
    }
    return merge(d, over)


DDPO = {"algorithm": {"objective": "ppo_clip", "advantage": "per_prompt_tracker", "tracker_buffer": 8,
                      "tracker_min_count": 6, "adv_clip": 5.0, "eps_low": 1e-4, "eps_high": 1e-4, "beta": 0.0,
                      "epochs": 1}}


def build(tmp_path, **over):
    cfg = validate_config(config_dict(tmp_path, **over))
    acc = make_accelerator(cfg)
    return cfg, build_components(cfg, acc)


@pytest.fixture(scope="module")
def comps(tmp_path_factory):
    return build(tmp_path_factory.mktemp("diff"))[1]


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def test_sampling_does_not_depend_on_batch_layout(comps):
    p, rows = comps.policy, comps.task.split("train")[:2]
    both = p.sample(rows, 2, seed=5, first_sample_id=10, first_group_id=0)
    second = p.sample(rows[1:], 2, seed=5, first_sample_id=12, first_group_id=1)
    assert torch.allclose(both.inputs["latents"][2:], second.inputs["latents"], atol=1e-5)
    assert torch.allclose(both.old_logp[2:], second.old_logp, atol=1e-5)
    other_seed = p.sample(rows[1:], 2, seed=6, first_sample_id=12, first_group_id=1)
    assert not torch.allclose(other_seed.inputs["latents"], second.inputs["latents"])
    assert both.group_ids.tolist() == [0, 0, 1, 1] and len(both.completions) == 4
    assert both.completions[0].size == (16, 16)


def test_recomputed_log_probs_equal_sampling_and_flow_to_the_unet(comps):
    p = comps.policy
    ro = p.sample(comps.task.split("train")[:2], 2, seed=0, first_sample_id=0, first_group_id=0)
    assert ro.old_logp.shape == ro.mask.shape == (4, 4)
    logp, entropy = p.log_probs(ro)
    assert entropy is None
    torch.testing.assert_close(logp, ro.old_logp, atol=1e-4, rtol=1e-4)
    logp.sum().backward()
    grads = [q.grad for q in p.trainable_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(q.grad is None for q in p.vae.parameters()) and all(q.grad is None for q in p.text_encoder.parameters())
    p.module.zero_grad(set_to_none=True)
    torch.testing.assert_close(p.reference_log_probs(ro), ro.old_logp, atol=1e-4, rtol=1e-4)  # reference = start


def test_timestep_fraction_trains_a_subset_of_steps(tmp_path):
    _, c = build(tmp_path, task={"timestep_fraction": 0.5})
    ro = c.policy.sample(c.task.split("train")[:1], 3, seed=0, first_sample_id=0, first_group_id=0)
    assert ro.mask.sum(-1).tolist() == [2.0, 2.0, 2.0]
    logp, _ = c.policy.log_probs(ro)
    assert torch.all(logp[ro.mask == 0] == 0) and torch.all(logp[ro.mask == 1] != 0)


def _unet_state(path):
    from safetensors.torch import load_file

    return load_file(path / "model" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("over", [{}, DDPO], ids=["prdp", "ddpo"])
def test_a_few_steps_train_and_change_the_unet(tmp_path, over):
    summary = train(validate_config(config_dict(tmp_path, **over)))
    run = tmp_path / "runs" / "diff"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) for r in steps)
    assert {"eval/reward", "eval/reward_ode", "eval/kl_to_base"} <= set(lines[0])
    assert lines[0]["eval/kl_to_base"] == 0.0  # before RL the policy is its reference
    a, b = _unet_state(run / "checkpoints" / "step_000001"), _unet_state(run / "checkpoints" / "step_000002")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert np.isfinite(summary["before"]) and np.isfinite(summary["after"])
    final = [r for r in lines if r["step"] == 2 and "eval/kl_to_base" in r][-1]
    assert final["eval/kl_to_base"] > 0 and summary["after_metrics"]["kl_to_base"] == final["eval/kl_to_base"]
    from PIL import Image

    grid = Image.open(run / "samples" / "step_000002.png")  # 4 held-out prompts x 2 seeds, ODE over SDE rows
    assert grid.size == (16 * 8, 2 * 16 * 4) and (run / "samples" / "step_000000.png").exists()
    if over:
        assert steps[-1]["tracked_prompts"] > 0
    else:
        assert "prdp_loss_unclipped" in steps[-1]


def test_resume_continues_exactly_with_tracker_state(tmp_path):
    """N steps equal N/2 + resume + N/2 (per-prompt tracker and sampler state included)."""
    full = config_dict(tmp_path, name="full", train={"steps": 4}, checkpoint={"every": 2}, **DDPO)
    train(validate_config(full))
    half = config_dict(tmp_path, name="half", train={"steps": 2}, checkpoint={"every": 2}, **DDPO)
    train(validate_config(half))
    train(validate_config(merge(half, {"train": {"steps": 4}, "checkpoint": {"resume": True}})))
    a = _unet_state(tmp_path / "runs" / "full" / "checkpoints" / "step_000004")
    b = _unet_state(tmp_path / "runs" / "half" / "checkpoints" / "step_000004")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_lora_reference_is_the_adapter_disabled_base_and_checkpoint_is_an_adapter(tmp_path):
    over = {"model": {"lora": {"r": 4, "alpha": 4}}, "train": {"steps": 1}, "optim": {"lr": 5e-2}}
    cfg = validate_config(config_dict(tmp_path, **over))
    acc = make_accelerator(cfg)
    c = build_components(cfg, acc)
    assert c.policy._reference is None  # no copy: the adapter is switched off instead
    train(cfg, acc)
    ckpt = tmp_path / "runs" / "diff" / "checkpoints" / "step_000001" / "model"
    assert (ckpt / "adapter_model.safetensors").exists()
    # a fresh build + the adapter gives the trained policy; its reference is still the base
    c2 = build(tmp_path, **over)[1]
    ro = c2.policy.sample(c2.task.split("train")[:1], 2, seed=0, first_sample_id=0, first_group_id=0)
    base = c2.policy.log_probs(ro)[0].detach()
    load_hf_weights(c2.policy.module.model, ckpt)
    tuned = c2.policy.log_probs(ro)[0].detach()
    assert not torch.allclose(base, tuned)
    torch.testing.assert_close(c2.policy.reference_log_probs(ro), base, atol=1e-5, rtol=1e-5)


def test_rlft_eval_and_sample_reproduce_the_summary(tmp_path):
    """`rlft eval` of the final checkpoint gives `after`; the RLG sweep at w=0 / w=1 gives before / after."""
    from shared.cli import main

    d = config_dict(tmp_path, optim={"lr": 5e-3})
    summary = train(validate_config(d))
    cfg_path = tmp_path / "diff.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    ckpt = tmp_path / "runs" / "diff" / "checkpoints" / "step_000002"
    assert main(["eval", str(cfg_path), f"checkpoint={ckpt}"]) == 0
    result = json.loads((ckpt / "eval.json").read_text())
    assert result["value"] == summary["after"] and result["metrics"]["kl_to_base"] > 0
    assert main(["sample", str(cfg_path), "checkpoint=latest", "ws=[0, 1, 1.5]"]) == 0
    rlg = json.loads((tmp_path / "runs" / "diff" / "rlg" / "rlg.json").read_text())
    assert rlg["mean_reward"][0] == summary["before"] and rlg["mean_reward"][1] == summary["after"]
    assert (tmp_path / "runs" / "diff" / "rlg" / "grid.png").exists()
    assert (tmp_path / "runs" / "diff" / "rlg" / "reward_vs_w.png").exists()


def test_sample_cli_errors_are_one_line(tmp_path, capsys):
    from shared.cli import main

    cfg_path = tmp_path / "diff.yaml"
    cfg_path.write_text(yaml.safe_dump(config_dict(tmp_path)))
    assert main(["sample", str(cfg_path)]) == 2
    assert main(["sample", str(cfg_path), "checkpoint=latest"]) == 2
    assert main(["sample", str(cfg_path), f"checkpoint={tmp_path}", "ws=[a,b]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("rlft: error:") for line in err)


DIST_SCRIPT = """
import json, sys
from accelerate import Accelerator
from shared.config import validate_config
from shared.loop import train
cfg = validate_config(json.load(open(sys.argv[1])), "dist")
acc = Accelerator(cpu=True)
train(cfg, acc)
acc.end_training()
"""


@pytest.mark.slow
def test_two_process_lora_run_equals_one_process(tmp_path):
    """LoRA gradients are synchronised across processes (METHODS.md D.6): 2 x half the micro-batches
    take the same optimizer steps as 1 process."""
    from safetensors.torch import load_file

    from tests.test_loop import _free_port

    lora = {"model": {"lora": {"r": 4, "alpha": 4}}, "optim": {"lr": 1e-2}, "checkpoint": {"every": 0}}
    one = config_dict(tmp_path, name="one", train={"steps": 2, "micro_batch_size": 4, "grad_accum_steps": 2}, **lora)
    train(validate_config(one))
    two = config_dict(tmp_path, name="two", train={"steps": 2, "micro_batch_size": 4, "grad_accum_steps": 1}, **lora)
    (tmp_path / "two.json").write_text(json.dumps(two))
    (tmp_path / "dist.py").write_text(DIST_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), str(tmp_path / "dist.py"), str(tmp_path / "two.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-1500:]
    name = "step_000002/model/adapter_model.safetensors"
    a = load_file(tmp_path / "runs" / "one" / "checkpoints" / name)
    b = load_file(tmp_path / "runs" / "two" / "checkpoints" / name)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # the adapter did train
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)  # Adam magnifies float32 reduction-order noise


def test_chunked_checkpointed_log_probs_equal_one_batch(comps):
    """logprob_chunk_size splits the (sample, step) pairs; values and gradients do not change."""
    p = comps.policy
    ro = p.sample(comps.task.split("train")[:2], 2, seed=3, first_sample_id=0, first_group_id=0)
    params = p.trainable_parameters()

    def run(chunk):
        p.logprob_chunk_size = chunk
        lp = p.log_probs(ro)[0]
        grads = torch.autograd.grad((lp * torch.arange(lp.numel()).view_as(lp)).sum(), params, allow_unused=True)
        return lp.detach(), [g for g in grads if g is not None]

    try:
        lp_one, g_one = run(1024)
        lp_chunked, g_chunked = run(3)
    finally:
        p.logprob_chunk_size = 1024
    torch.testing.assert_close(lp_chunked, lp_one, atol=1e-5, rtol=1e-5)
    a, b = torch.cat([g.flatten() for g in g_chunked]), torch.cat([g.flatten() for g in g_one])
    assert float((a - b).norm() / b.norm()) < 1e-4  # float32 sums in another order


def test_sampling_in_chunks_equals_one_batch(comps):
    p, rows = comps.policy, comps.task.split("train")[:2]
    whole = p.sample(rows, 2, seed=9, first_sample_id=0, first_group_id=0)
    p.sample_batch_size = 3
    try:
        chunked = p.sample(rows, 2, seed=9, first_sample_id=0, first_group_id=0)
    finally:
        p.sample_batch_size = 64
    torch.testing.assert_close(chunked.inputs["latents"], whole.inputs["latents"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.old_logp, whole.old_logp, atol=1e-5, rtol=1e-5)
    assert len(chunked.completions) == 4


def test_warmup_pretrains_once_into_a_loadable_cache(tmp_path, monkeypatch):
    """The embedded pipeline's warm-up (VAE, then denoising loss) is saved with save_pretrained, loaded back
    with StableDiffusionPipeline.from_pretrained, and reused by later runs whatever their RL seed."""
    import diffusion_rl.recipe as recipe

    over = {"warmup": {"enabled": True, "max_steps": 3, "batch_size": 4, "warmup_steps": 1},
            "task": {"vae_steps": 2}}
    torch.manual_seed(123)
    cfg, c = build(tmp_path, **over)
    cache = recipe.pretrain_dir(cfg)
    record = json.loads((cache / "warmup.json").read_text())
    assert record["vae_steps"] == 2 and record["unet_steps"] == 3 and (cache / "model_index.json").exists()
    after_build = torch.rand(1)

    def no_pretrain(*a, **k):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(recipe, "pretrain", no_pretrain)
    torch.manual_seed(123)
    cfg2, c2 = build(tmp_path, seed=7, **over)  # another RL seed: same base
    assert recipe.pretrain_dir(cfg2) == cache
    assert torch.equal(torch.rand(1), after_build)  # a cold cache leaves the RNG as a warm one does
    a, b = c.policy.unet().state_dict(), c2.policy.unet().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert c2.policy.vae.config.scaling_factor == c.policy.vae.config.scaling_factor != 0.18215


def test_prompt_file_task_errors_are_one_line(tmp_path, capsys):
    from shared.cli import main

    cfg = ROOT / "configs" / "diffusion" / "sd15_ddpo_compressibility.yaml"
    assert main(["validate", str(cfg), f"task.train_path={tmp_path / 'missing.txt'}"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat"}\n{"prompt": 3}\n')
    from diffusion_rl.tasks.common import read_prompts

    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string 'prompt'"):
        read_prompts(str(bad))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.txt" in err[0] and "not found" in err[0]


def test_report_separates_held_out_prompts_from_fresh_seeds_of_rl_prompts():
    """`reward` (summary) covers only the held-out prompts; `reward_train_prompts` the RL prompts' fresh seeds."""
    from PIL import Image

    from diffusion_rl.tasks.shapes import ShapePromptsConfig, ShapePromptsTask
    from shared.config import RewardSpec
    from shared.rewards import CombinedReward

    task = ShapePromptsTask(ShapePromptsConfig(held_out=["red circle"], eval_images=2, eval_train_images=1))
    task.reward = CombinedReward.from_specs([RewardSpec(name="color_area")])
    rows = task.split("eval")
    assert [r["eval_set"] for r in rows[:3]] == ["held_out", "held_out", "train_prompts"]
    assert len(rows) == 2 + 17 and all(r["prompt"] != "a red circle" for r in rows[2:])
    assert {r["seed"] for r in rows[2:]} == {2}  # fresh seeds, never those of the held-out images

    def img(rgb, frac):  # an 8x8 image whose first `frac` of pixels have colour rgb
        px = np.zeros((8, 8, 3), np.uint8)
        px.reshape(-1, 3)[: int(64 * frac)] = rgb
        return Image.fromarray(px)

    comps = [{"image": img(r["rgb"], f), "ode_image": img(r["rgb"], f / 2), "kl": 1.0 + i}
             for i, (r, f) in enumerate(zip(rows, [0.5, 0.25] + [1.0] * 17))]
    m = task.metrics(comps, rows)
    assert m["reward"] == pytest.approx(0.375) and m["reward_ode"] == pytest.approx(0.1875)
    assert m["reward_train_prompts"] == pytest.approx(1.0) and m["kl_to_base"] == pytest.approx(1.5)


FLOW_GRPO = {"task": {"step": "flow_sde", "eta": 0.7, "vae_steps": 2},
             "warmup": {"enabled": True, "max_steps": 3, "batch_size": 4, "warmup_steps": 1},
             "algorithm": {"objective": "ppo_clip", "advantage": "grpo", "eps_low": 1e-4, "eps_high": 1e-4,
                           "beta": 0.04, "epochs": 1}}


def test_flow_sde_policy_pretrains_samples_and_trains_on_the_same_loop(tmp_path):
    """task.step: flow_sde pre-trains a velocity UNet (rectified flow), saves it with its flow-matching
    scheduler, loads it back, samples SDE trajectories whose stored log-probs the policy reproduces, and
    trains with GRPO advantages + PPO clip + KL (Flow-GRPO) through the unchanged loop."""
    cfg, c = build(tmp_path, **FLOW_GRPO)
    p = c.policy
    assert type(p.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    ro = p.sample(c.task.split("train")[:2], 2, seed=0, first_sample_id=0, first_group_id=0)
    assert ro.inputs["timesteps"].dtype == torch.float32 and ro.inputs["timesteps"][0, 0] == 1000.0
    torch.testing.assert_close(p.log_probs(ro)[0], ro.old_logp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(p.reference_log_probs(ro), ro.old_logp, atol=1e-4, rtol=1e-4)
    summary = train(cfg)
    run = tmp_path / "runs" / "diff"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in lines if "loss" in r)
    a, b = _unet_state(run / "checkpoints" / "step_000001"), _unet_state(run / "checkpoints" / "step_000002")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert summary["after_metrics"]["kl_to_base"] > 0 and np.isfinite(summary["after"])
