"""What a domain hands the loop: a policy, a task and a combined reward.

Each domain package exposes `build(cfg, accelerator) -> Components` (llm_rl.recipe.build, ...).
The loop looks it up by `cfg.domain` in `DOMAINS`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.config import ConfigError
from shared.rewards import CombinedReward

# config `model.dtype` -> torch dtype, for every domain's model loading
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

DOMAINS = {"llm": "llm_rl.recipe", "vision": "vision_rl.recipe", "diffusion": "diffusion_rl.recipe"}


@dataclass
class Components:
    policy: Any  # implements the Policy contract (see shared/policy.py)
    task: Any  # implements shared.task.Task
    reward: CombinedReward
    info: dict[str, Any] = field(default_factory=dict)  # e.g. warm-up results for the summary


def build_components(cfg, accelerator) -> Components:
    name = DOMAINS[cfg.domain]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:  # a genuine missing dependency inside the recipe: let it surface
            raise
        raise ConfigError(f"domain: {cfg.domain!r} has no training recipe in this version of rlft") from None
    return module.build(cfg, accelerator)


def checkpoint_replaces_warmup(cfg) -> bool:
    """Whether a training checkpoint holds everything the warm start produced (so evaluating it skips the
    warm-up). A recipe whose checkpoints hold part of the model (diffusion: the UNet, not the warmed-up
    VAE and text encoder) sets `CHECKPOINT_REPLACES_WARMUP = False`."""
    return getattr(importlib.import_module(DOMAINS[cfg.domain]), "CHECKPOINT_REPLACES_WARMUP", True)


def combined_reward(cfg) -> CombinedReward:
    """The config's reward components, or a one-line ConfigError."""
    try:
        reward = CombinedReward.from_specs(cfg.rewards, source_field=cfg.sampler.source_field)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not reward.components:
        raise ConfigError("rewards: at least one reward is required for RL")
    return reward


def warm_start(cfg, accelerator, model, make_policy, task) -> dict:
    """Run (or load from the cache) the SFT warm-up of `model` in place; returns its record for the summary.

    The main process trains and writes the cache; every process then loads the same weights.
    """
    from shared.checkpoint import load_hf_weights
    from shared.sft import cached_warmup_dir, run_sft, save_warmup

    cache = cached_warmup_dir(cfg)
    if not (cache / "warmup.json").exists():
        if accelerator.is_main_process:
            policy = make_policy(model)
            record = run_sft(policy, task, cfg.warmup, cfg.seed, log=accelerator.print)
            save_warmup(policy, record, cache)
        accelerator.wait_for_everyone()
    load_hf_weights(model, cache)
    record = json.loads((cache / "warmup.json").read_text())
    return {k: v for k, v in record.items() if k != "history"} | {"cache": str(cache)}


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in backward (transformers >= 5 renamed gradient_checkpointing_enable)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
