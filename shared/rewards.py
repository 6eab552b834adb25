"""Rewards: named components, combined with weights from config, isolated from failure.

A reward is a pure function

    reward(completions: list[str], **fields: list) -> list[float | None]

where each keyword is a dataset column aligned with `completions` (answer, boxes, label, ...).
Return None for an output the reward cannot evaluate (unparseable, missing tag). Rewards are
registered by name as *factories*: `REWARDS[name](**kwargs) -> reward`, the kwargs coming from the
config's `rewards[i].kwargs`.

`CombinedReward` never lets a reward end a run: a None, NaN or inf score, or an exception, gives
that sample the component's `failure_value` and adds one to its logged failure counter. If a
reward raises on a batch, it is retried sample by sample so one bad output cannot zero the rest.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

RewardFn = Callable[..., list]
REWARDS: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str):
    """Register a reward factory under `name` (decorator)."""

    def deco(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is registered twice")
        REWARDS[name] = factory
        return factory

    return deco


@dataclass
class RewardResult:
    total: Tensor  # [B] weighted sum of components
    components: dict[str, Tensor]  # name -> [B] unweighted scores (failures already replaced)
    failures: dict[str, int]  # name -> failed samples in this batch


@dataclass
class _Component:
    name: str
    fn: RewardFn
    weight: float
    failure_value: float
    start_step: int = 0
    sources: tuple[str, ...] | None = None  # score only rows of these datasets (others get 0)


@dataclass
class CombinedReward:
    """Weighted sum of named reward components with failure isolation and counting."""

    components: list[_Component]
    failure_totals: Counter = field(default_factory=Counter)
    source_field: str = "source"  # the row field naming each row's dataset, for components with `sources`

    @classmethod
    def from_specs(cls, specs: Sequence[Any], registry: dict[str, Callable[..., RewardFn]] | None = None,
                   source_field: str = "source"):
        registry = REWARDS if registry is None else registry
        comps = []
        for i, s in enumerate(specs):
            if s.name not in registry:
                import difflib

                close = difflib.get_close_matches(s.name, list(registry), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"rewards[{i}].name: unknown reward {s.name!r}{hint}; known: {', '.join(sorted(registry))}")
            try:
                fn = registry[s.name](**s.kwargs)
            except TypeError as e:
                raise ValueError(f"rewards[{i}] ({s.name}): bad kwargs {s.kwargs}: {e}") from None
            sources = tuple(s.sources) if getattr(s, "sources", None) is not None else None
            comps.append(_Component(s.name, fn, float(s.weight), float(s.failure_value), int(s.start_step), sources))
        if len({c.name for c in comps}) != len(comps):
            raise ValueError("rewards: each reward name may appear once")
        return cls(comps, source_field=source_field)

    def weights(self, step: int | None = None) -> dict[str, float]:
        """Each component's weight at RL step `step` (0 before its start_step); None: the full weights."""
        return {c.name: c.weight if step is None or step >= c.start_step else 0.0 for c in self.components}

    def __call__(self, completions: list[str], fields: dict[str, list], step: int | None = None) -> RewardResult:
        n = len(completions)
        weights = self.weights(step)
        total = torch.zeros(n, dtype=torch.float32)
        out: dict[str, Tensor] = {}
        fails: dict[str, int] = {}
        for c in self.components:
            if c.sources is None:
                scores, failed = score_isolated(c.fn, completions, fields, c.failure_value, c.name)
            else:  # a dataset's own reward (MoDoMoDo): rows of other datasets score 0 and are not failures
                mine = [i for i, s in enumerate(reward_field(fields, self.source_field, n, c.name)) if s in c.sources]
                part, failed = ([], 0) if not mine else score_isolated(c.fn, [completions[i] for i in mine],
                                              {k: [v[i] for i in mine] for k, v in fields.items()}, c.failure_value, c.name)
                scores = [0.0] * n
                for i, v in zip(mine, part):
                    scores[i] = v
            out[c.name] = torch.tensor(scores, dtype=torch.float32)
            fails[c.name] = failed
            self.failure_totals[c.name] += failed
            total += weights[c.name] * out[c.name]
        return RewardResult(total, out, fails)


def reward_field(fields: dict[str, list], name: str, n: int, reward: str) -> list:
    """The dataset column `name` aligned with n completions, or a ValueError naming the reward and field."""
    if name not in fields:
        raise ValueError(f"{reward}: needs the dataset field {name!r}; got fields {sorted(fields)}")
    col = list(fields[name])
    if len(col) != n:
        raise ValueError(f"{reward}: field {name!r} has {len(col)} values for {n} completions")
    return col


def _clean(value: Any, failure_value: float) -> tuple[float, bool]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return failure_value, True
    if not math.isfinite(v):
        return failure_value, True
    return v, False


def score_isolated(
    fn: RewardFn, completions: list[str], fields: dict[str, list], failure_value: float, name: str = "reward"
) -> tuple[list[float], int]:
    """Run `fn` on a batch; never raise. Returns (scores, number of failed samples)."""
    n = len(completions)
    try:
        raw = list(fn(completions, **fields))
        if len(raw) != n:
            raise ValueError(f"returned {len(raw)} scores for {n} completions")
    except Exception as e:  # noqa: BLE001 - isolation is the point
        log.warning("reward %s raised on a batch (%s: %s); scoring sample by sample", name, type(e).__name__, e)
        raw = []
        for i in range(n):
            try:
                one = list(fn([completions[i]], **{k: [v[i]] for k, v in fields.items()}))
                raw.append(one[0] if len(one) == 1 else None)
            except Exception:  # noqa: BLE001
                raw.append(None)
    scores, failed = [], 0
    for r in raw:
        v, bad = _clean(r, failure_value)
        scores.append(v)
        failed += bad
    return scores, failed
