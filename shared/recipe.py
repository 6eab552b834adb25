"""What a domain hands the loop: a policy, a task and a combined reward.

Each domain package exposes `build(cfg, accelerator) -> Components` (llm_rl.recipe.build, ...).
The loop looks it up by `cfg.domain` in `DOMAINS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from shared.config import ConfigError
from shared.rewards import CombinedReward

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
