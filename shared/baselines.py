"""Per-prompt baselines b(x) for the advantages that need one (`remax`, `alol`).

An advantage estimator names its baseline in `ADVANTAGE_BASELINE`; `build_baseline` makes the function
`baseline(rows, step) -> Tensor [len(rows)]` once, before RL, and the rollout collector stores its
values per sample (`Rollout.extras["baseline"]`).

| baseline     | b(x)                                                        | advantage |
|--------------|-------------------------------------------------------------|-----------|
| `greedy`     | reward of the current policy's greedy output for x (ReMax)  | `remax`   |
| `value_head` | V(x), a value head fit to the reference's rewards (A-LoL; registered by llm_rl) | `alol` |
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from shared.rollout import row_fields

Baseline = Callable[[list[dict], "int | None"], Tensor]

ADVANTAGE_BASELINE = {"remax": "greedy", "alol": "value_head"}


def greedy_rewards(policy, reward_fn, rows: list[dict], step: int | None = None) -> Tensor:
    """Combined reward of the policy's greedy output for each row, scored like sampled completions (with
    their token lengths, for length-shaped rewards; failures score their failure value)."""
    with torch.no_grad():
        if hasattr(policy, "generate"):  # token policies: lengths from the completion mask
            _, mask, completions, _ = policy.generate(rows, 1, seed=None)
            rows = [dict(r, completion_length=int(n)) for r, n in zip(rows, mask.sum(-1).tolist())]
        else:
            completions = policy.complete(rows)
    return reward_fn(completions, row_fields(rows), step=step).total.float().cpu()


def greedy_baseline(policy, task, reward_fn, cfg, accelerator) -> Baseline:
    """ReMax: b(x) = r(x, greedy output of the current policy); one extra greedy decode per prompt."""
    return lambda rows, step=None: greedy_rewards(policy, reward_fn, rows, step)


BASELINES: dict[str, Callable[..., Baseline]] = {"greedy": greedy_baseline}


def build_baseline(advantage: str, policy, task, reward_fn, cfg, accelerator) -> Baseline | None:
    """The baseline the advantage estimator needs, or None."""
    name = ADVANTAGE_BASELINE.get(advantage)
    if name is None:
        return None
    if name not in BASELINES:
        raise ValueError(f"advantage {advantage!r} needs the {name!r} baseline, which domain {cfg.domain!r} does not provide")
    return BASELINES[name](policy, task, reward_fn, cfg, accelerator)
