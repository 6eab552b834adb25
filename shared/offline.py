"""Offline rows: dataset rows that carry their own completions, so the loop trains without sampling.

An offline row is an ordinary row (a dict with at least ``"prompt"``) plus a group of completions in
one of three forms, checked in this order:

1. **Scored group** -- ``{"completions": [str, ...], "rewards": [float, ...], "margins": [float, ...]}``;
   ``rewards`` and ``margins`` are optional, one number per completion.
2. **Preference pair** -- ``{"chosen": str, "rejected": str, "margins": [m_chosen, m_rejected]}``;
   gives completions ``[chosen, rejected]`` with rewards ``[1.0, 0.0]``; ``margins`` is optional.
3. **Demonstration** -- ``{"completion": str, "reward": float}``; gives ``[completion]`` and ``[reward]``,
   ``reward`` being optional.

Rewards absent from the data are computed by the configured reward functions, as for sampled
completions. Margins are MODPO's margin rewards ``r_{-k}(x, y)``: the score of the objective
*other* than the one the preferences express (a combination when there are several), one number per
completion; MODPO weights it by ``1 - algorithm.modpo_weight``.

Every problem is a :class:`~shared.config.ConfigError` whose one-line message names the row
(``"<file>:<line>"`` for rows read from jsonl).
"""

from __future__ import annotations

import math

import torch

from shared.config import ConfigError


def _numbers(value: object, key: str, n: int, where: str) -> list[float]:
    """`value` as a list of `n` finite floats; `key` names it in the error."""
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {key!r} must be a list of numbers, got {type(value).__name__}")
    if len(value) != n:
        raise ConfigError(f"{where}: {key!r} has {len(value)} values for {n} completions")
    for v in value:
        # bool is an int subclass but a true/false label is almost surely a data mistake
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ConfigError(f"{where}: {key!r} must hold finite numbers, got {v!r}")
    return [float(v) for v in value]


def offline_group(row: dict, where: str) -> tuple[list[str], list[float] | None, list[float] | None]:
    """(completions, rewards or None, margins or None) of one offline row; `where` names it in errors."""
    if "completions" in row:
        completions = row["completions"]
        if not isinstance(completions, list) or not completions:
            raise ConfigError(f"{where}: 'completions' must be a non-empty list of strings")
        rewards, reward_key = row.get("rewards"), "rewards"
    elif "chosen" in row or "rejected" in row:
        if "chosen" not in row or "rejected" not in row:
            missing = "rejected" if "chosen" in row else "chosen"
            raise ConfigError(f"{where}: preference pair lacks {missing!r} (need both 'chosen' and 'rejected')")
        completions, rewards, reward_key = [row["chosen"], row["rejected"]], [1.0, 0.0], "rewards"
    elif "completion" in row:
        completions = [row["completion"]]
        rewards, reward_key = ([row["reward"]] if "reward" in row else None), "reward"
    else:
        raise ConfigError(f"{where}: no completions (give 'completions', 'chosen'/'rejected' or 'completion')")
    for c in completions:
        if not isinstance(c, str):
            raise ConfigError(f"{where}: completions must be strings, got {type(c).__name__} {c!r}")
    n = len(completions)
    rewards = None if rewards is None else _numbers(rewards, reward_key, n, where)
    margins = None if row.get("margins") is None else _numbers(row["margins"], "margins", n, where)
    return completions, rewards, margins


def check_offline_rows(rows: list[dict], group_size: int, split: str = "train") -> None:
    """Check that every row gives exactly `group_size` completions (rollout.samples_per_prompt): the
    loop forms groups of that size, so a row with another count cannot be trained on as given."""
    if not rows:
        raise ConfigError(f"{split}: no offline rows")
    for i, row in enumerate(rows):
        where = row.get("_where") or f"{split} row {i}"
        n = len(offline_group(row, where)[0])
        if n != group_size:
            raise ConfigError(f"{where}: {n} completions but rollout.samples_per_prompt is {group_size}; "
                              f"set rollout.samples_per_prompt to {n} (every row must give the same number)")


def offline_rollout(policy, rows: list[dict], first_group_id: int):
    """(Rollout of the rows' own completions, their data rewards [B] or None when the data has none).

    Group ids continue from `first_group_id` (the rows' global draw positions), one group per row; the
    data's margins become `extras["margin"]`. Rewards must be given by every row of a batch or by none.
    """
    groups = [offline_group(row, row.get("_where") or f"train row {first_group_id + i}") for i, row in enumerate(rows)]
    rollout = policy.rollout_from(rows, [g[0] for g in groups], first_group_id)
    given = [g[1] is not None for g in groups]
    if any(given) and not all(given):
        raise ConfigError(f"offline rows {first_group_id}..{first_group_id + len(rows) - 1}: some rows give rewards and "
                          "some do not; give rewards for every row or for none (then the reward functions score them)")
    rewards = torch.tensor([r for g in groups for r in g[1]], dtype=torch.float32) if all(given) else None
    if any(g[2] is not None for g in groups):
        if not all(g[2] is not None for g in groups):
            raise ConfigError(f"offline rows {first_group_id}..{first_group_id + len(rows) - 1}: "
                              "'margins' must be given by every row or by none")
        rollout.extras["margin"] = torch.tensor([m for g in groups for m in g[2]], dtype=torch.float32)
    return rollout, rewards
