"""What a domain hands the loop: a policy, a task and a combined reward.

Each domain package exposes `build(cfg, accelerator) -> Components` (llm_rl.recipe.build, ...).
The loop looks it up by `cfg.domain` in `DOMAINS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from shared.rewards import CombinedReward

DOMAINS = {"llm": "llm_rl.recipe", "vision": "vision_rl.recipe", "diffusion": "diffusion_rl.recipe"}


@dataclass
class Components:
    policy: Any  # implements the Policy contract (see shared/policy.py)
    task: Any  # implements shared.task.Task
    reward: CombinedReward
    info: dict[str, Any] = field(default_factory=dict)  # e.g. warm-up results for the summary


def build_components(cfg, accelerator) -> Components:
    try:
        module = importlib.import_module(DOMAINS[cfg.domain])
    except ModuleNotFoundError as e:
        raise NotImplementedError(f"domain {cfg.domain!r} has no recipe yet ({e.name})") from None
    return module.build(cfg, accelerator)
