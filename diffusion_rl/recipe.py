"""Builds the diffusion-RL components from a config: pipeline (embedded + warm-up, or a checkpoint), LoRA,
policy, task, rewards.

`model.name_or_path: embedded` builds the tiny pipeline of diffusion_rl.embedded and, with
`warmup.enabled`, pre-trains it (VAE, then the denoising loss; cached by content hash, see
diffusion_rl/pretrain.py). Any other value is a local path or hub id of a Stable-Diffusion-family
pipeline loaded with `StableDiffusionPipeline.from_pretrained`.

The policy's reference (the RL starting point) is snapshotted here, so the held-out KL to the base is
reported for every objective, with or without a KL term in the loss.
"""

from __future__ import annotations

import torch

import diffusion_rl.objectives  # noqa: F401  (registers PRDP)
import diffusion_rl.rewards  # noqa: F401  (registers the image rewards)
from diffusion_rl.embedded import build_pipeline
from diffusion_rl.policy import DiffusionPolicy
from diffusion_rl.pretrain import pretrain, pretrain_dir, save_pipeline
from diffusion_rl.tasks.common import PromptFileConfig, prompt_file_task
from diffusion_rl.tasks.shapes import ShapePromptsConfig, ShapePromptsTask
from shared.attention import check_attention, set_unet_attention
from shared.config import ConfigError, RunConfig
from shared.recipe import DTYPES, Components, combined_reward

# a checkpoint holds the UNet (or its adapter) only: evaluating it still needs the warmed-up VAE and text encoder
CHECKPOINT_REPLACES_WARMUP = False
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attention projections, as in DDPO / diffusers LoRA


def make_task(cfg: RunConfig):
    t = cfg.task_config()
    try:
        if isinstance(t, ShapePromptsConfig):
            return ShapePromptsTask(t)
        if isinstance(t, PromptFileConfig):
            return prompt_file_task(t)
    except ValueError as e:
        raise ConfigError(f"task: {e}") from None
    raise ConfigError(f"task.name: {cfg.task['name']!r} is not a diffusion task")


def fresh_pipeline(task, t: ShapePromptsConfig):
    """The embedded pipeline's initial weights: the same in every process and run (independent of the RL seed,
    like the pre-training cache key)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_pipeline(task.words(), t.image_size, t.unet_channels, t.text_dim, t.step)


def load_pipeline(cfg: RunConfig, task, accelerator):
    """The embedded pipeline (warmed up and cached when configured) or a checkpoint's."""
    from diffusers import StableDiffusionPipeline

    m, t = cfg.model, cfg.task_config()
    info: dict = {}
    if m.name_or_path == "embedded":
        if not isinstance(t, ShapePromptsConfig):
            raise ConfigError("model.name_or_path: 'embedded' is only defined for task 'shape_prompts'; give a path or hub id")
        if not cfg.warmup.enabled:  # untrained weights: for tests of the machinery only
            return fresh_pipeline(task, t), info
        cache = pretrain_dir(cfg)
        if not (cache / "warmup.json").exists():
            if accelerator.is_main_process:
                with torch.random.fork_rng():  # a cold cache leaves the run's RNG state as a warm one does
                    pipe = fresh_pipeline(task, t)
                    save_pipeline(pipe, pretrain(pipe, task, cfg.warmup, log=accelerator.print), cache)
            accelerator.wait_for_everyone()
        path = str(cache)
        info["warmup"] = {"cache": path}
    else:
        if cfg.warmup.enabled:
            raise ConfigError("warmup.enabled: the diffusion warm-up pre-trains the embedded pipeline only; "
                              "a checkpoint starts RL as it is")
        path = m.name_or_path
    try:
        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=DTYPES[m.dtype], safety_checker=None,
                                                       requires_safety_checker=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: cannot load pipeline {path!r}: {str(e).splitlines()[0]}") from None
    if "warmup" in info:
        import json

        info["warmup"] |= json.loads((cache / "warmup.json").read_text())
    return pipe, info


def apply_lora(unet, cfg: RunConfig):
    """peft LoRA on the UNet; the reference is then the same UNet with the adapter disabled."""
    from peft import LoraConfig, get_peft_model

    lc = cfg.model.lora
    targets = lc.target_modules if "target_modules" in lc.model_fields_set else UNET_LORA_TARGETS
    try:
        return get_peft_model(unet, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                               target_modules=targets))
    except ValueError as e:
        raise ConfigError(f"model.lora.target_modules: {str(e).splitlines()[0]}") from None


def make_policy(pipe, unet, cfg: RunConfig) -> DiffusionPolicy:
    t = cfg.task_config()
    return DiffusionPolicy(pipe, unet, step=t.step, num_steps=t.num_steps, guidance_scale=t.guidance_scale, eta=t.eta,
                           eval_eta=t.eval_eta, timestep_fraction=t.timestep_fraction,
                           sample_batch_size=t.sample_batch_size, logprob_chunk_size=cfg.model.logprob_chunk_size)


def build(cfg: RunConfig, accelerator) -> Components:
    task = make_task(cfg)
    check_attention(cfg)  # before any loading or pre-training
    pipe, info = load_pipeline(cfg, task, accelerator)
    pipe.to(accelerator.device)
    unet = pipe.unet
    set_unet_attention(unet, cfg.model.attention)
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.model.lora is not None:
        unet = apply_lora(unet, cfg)
    policy = make_policy(pipe, unet, cfg)
    policy.build_reference()
    reward = combined_reward(cfg)
    task.reward = reward
    return Components(policy=policy, task=task, reward=reward, info=info)
