"""The diffusion GPU recipes for real checkpoints run end-to-end with tiny pieces substituted.

A tiny StableDiffusionPipeline (real UNet2DConditionModel / AutoencoderKL / CLIPTextModel classes, 16x16 images)
whose tokenizer knows every word of the animal prompt files is saved with `save_pretrained` and loaded back by the
recipe through `StableDiffusionPipeline.from_pretrained`, exactly as a hub checkpoint; the PickScore path of the
PRDP recipe is replaced by a tiny CLIPModel + CLIPProcessor saved locally. Everything else (objective, advantages,
tracker, LoRA targets, epochs, optimizer, prompt files, rewards) comes from the configs as written.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from shared.config import load_config
from tests.diffusion_rl.test_rewards import save_tiny_clip
from tests.helpers.tiny import ROOT

PRDP = ROOT / "configs/diffusion/sd14_prdp_small.yaml"
DDPO = ROOT / "configs/diffusion/sd15_ddpo_compressibility.yaml"
PROMPTS = ROOT / "configs/diffusion/prompts"


def _lines(name: str) -> list[str]:
    return [line.strip() for line in (PROMPTS / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from diffusion_rl.embedded import build_pipeline

    torch.manual_seed(0)
    words = {w.lower() for name in ("animals_train.txt", "animals_eval.txt") for p in _lines(name) for w in p.split()}
    path = tmp_path_factory.mktemp("sd_tiny")
    build_pipeline(sorted(words | {"a", "photo", "of"}), image_size=16, unet_channels=(16, 32),
                   text_dim=16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny CLIPModel + CLIPProcessor (hand-written character BPE tokenizer) standing in for PickScore."""
    return save_tiny_clip(tmp_path_factory.mktemp("pickscore_tiny"))


def _common(tmp_path, pipe) -> list[str]:
    return [f"model.name_or_path={pipe}", f"task.train_path={PROMPTS / 'animals_train.txt'}",
            f"task.eval_path={PROMPTS / 'animals_eval.txt'}", "task.num_steps=3", "task.eval_images=1",
            "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4", "train.steps=2",
            "train.mixed_precision=no", "eval.every=0", "eval.max_prompts=2", "eval.batch_size=2",
            "checkpoint.every=0", f"output_dir={tmp_path / 'runs'}", "logging.progress=false",
            "logging.tensorboard=false", "logging.plots=false"]


def _check_run(tmp_path, cfg) -> tuple[list[dict], object]:
    run = tmp_path / "runs" / cfg.name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric"] == "reward" and summary["steps"] == 2
    assert math.isfinite(summary["before"]) and math.isfinite(summary["after"])
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [s["step"] for s in steps] == [1, 2] and all(math.isfinite(s["loss"]) for s in steps)
    (ckpt,) = sorted((run / "checkpoints").glob("*/model"))  # only the final checkpoint (checkpoint.every=0)
    return steps, ckpt


def test_configs_validate_with_paper_values():
    prdp = load_config(PRDP)
    a, r = prdp.algorithm, prdp.rollout
    assert (a.objective, a.advantage, a.beta, a.prdp_eps, a.epochs) == ("prdp", "none", 3e-5, 1e-6, 10)
    assert (r.prompts_per_step, r.samples_per_prompt, prdp.train.steps) == (32, 16, 100)  # N, B, E
    assert (prdp.optim.lr, prdp.optim.weight_decay, prdp.optim.max_grad_norm) == (1e-5, 1e-4, 1.0)
    # every optimizer step is one full-batch update: K = 10 optimizer steps per sample batch
    assert prdp.train.micro_batch_size * prdp.train.grad_accum_steps == 32 * 16
    assert prdp.train.micro_batch_size % 16 == 0 and prdp.model.lora is None
    assert prdp.model.name_or_path == "CompVis/stable-diffusion-v1-4" and prdp.train.mixed_precision == "bf16"
    t = prdp.task_config()
    assert (t.num_steps, t.guidance_scale, t.eta, t.timestep_fraction) == (50, 5.0, 1.0, 1.0)
    assert prdp.rewards[0].name == "clip_score"

    ddpo = load_config(DDPO)
    a, r, tr = ddpo.algorithm, ddpo.rollout, ddpo.train
    assert (a.objective, a.advantage, a.adv_clip, a.eps_low, a.eps_high, a.beta) == (
        "ppo_clip", "per_prompt_tracker", 5.0, 1e-4, 1e-4, 0.0)
    assert (a.tracker_buffer, a.tracker_min_count, a.epochs) == (32, 16, 1)
    assert r.prompts_per_step * r.samples_per_prompt == 4 * tr.micro_batch_size * tr.grad_accum_steps
    assert (ddpo.optim.lr, ddpo.optim.weight_decay) == (3e-4, 1e-4)
    lora = ddpo.model.lora
    assert (lora.r, lora.alpha, lora.target_modules) == (4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    assert ddpo.model.name_or_path == "runwayml/stable-diffusion-v1-5"
    t = ddpo.task_config()
    assert (t.num_steps, t.guidance_scale, t.eta, t.timestep_fraction) == (50, 5.0, 1.0, 1.0)
    assert [s.name for s in ddpo.rewards] == ["jpeg_compressibility"]

    # the prompt files the configs name (relative to the repository root) exist and are disjoint
    for cfg in (prdp, ddpo):
        assert (ROOT / cfg.task["train_path"]).is_file() and (ROOT / cfg.task["eval_path"]).is_file()
    train, held_out = _lines("animals_train.txt"), _lines("animals_eval.txt")
    assert len(set(train)) == len(train) >= 40 and len(set(held_out)) == len(held_out) >= 10
    assert not set(train) & set(held_out)


def test_prdp_config_runs_with_tiny_pipeline(tmp_path, tiny_pipeline, tiny_clip):
    cfg = load_config(PRDP, _common(tmp_path, tiny_pipeline) + [
        "train.micro_batch_size=4", "train.grad_accum_steps=2",  # one group per micro-batch, full batch per step
        f"rewards=[{{name: clip_score, kwargs: {{model_path: {tiny_clip}, scale: 0.01}}}}]"])
    assert cfg.algorithm.epochs == 10 and cfg.algorithm.beta == 3e-5 and cfg.model.gradient_checkpointing
    from shared.loop import train

    train(cfg)
    steps, ckpt = _check_run(tmp_path, cfg)
    assert all(math.isfinite(s["kl_ref"]) and s["grad_norm"] > 0 for s in steps)
    assert "reward/clip_score" in steps[0] and steps[0]["reward_failures/clip_score"] == 0
    before = load_file(tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(ckpt / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_ddpo_config_runs_with_tiny_pipeline(tmp_path, tiny_pipeline):
    cfg = load_config(DDPO, _common(tmp_path, tiny_pipeline) + ["train.micro_batch_size=1", "train.grad_accum_steps=2"])
    assert cfg.model.lora is not None and cfg.algorithm.advantage == "per_prompt_tracker"
    from shared.loop import train

    train(cfg)
    steps, ckpt = _check_run(tmp_path, cfg)
    assert "reward/jpeg_compressibility" in steps[0] and all(s["grad_norm"] > 0 for s in steps)
    adapter = load_file(ckpt / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: nonzero means it trained
    assert {m for k in adapter for m in ("to_q", "to_k", "to_v", "to_out") if m in k} == {"to_q", "to_k", "to_v",
                                                                                            "to_out"}
    assert (ckpt / "adapter_config.json").is_file()
