"""Prompt samplers. A sampler yields indices into the task's `train` split, one batch per draw.

Contract (used by shared/loop.py):

    cursor: int                      prompts handed out so far; the global id of the next prompt drawn
                                     (the loop uses it as the group id, so ids are unique and resumable)
    next_batch(n=None) -> list[int]  the next n item indices (default `batch_size`; fewer when rollout replay
                                     fills part of the step)
    update(group_ids, stats)         feedback after a step: `group_ids` [N] are draw positions (cursor
                                     values) of the trained samples, `stats` holds per-sample tensors
                                     ("rewards", "advantages") aligned with them
    metrics() -> dict[str, float]    values worth logging each step (e.g. arm probabilities)
    state_dict() / load_state_dict() everything needed to continue exactly after a resume

`UniformSampler` walks seeded permutations epoch by epoch. `SECSampler` is the Self-Evolving
Curriculum bandit (METHODS.md B.7). Both draw with generators seeded by (seed, cursor), so they
keep no hidden RNG state. `MixtureSampler` (shared/mixture.py) draws fixed dataset weights;
`DOTSSampler` (shared/dots.py) also implements `prepare(step, probe)`, called by the loop before
each draw, to measure pass rates with the policy.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor


class UniformSampler:
    def __init__(self, num_items: int, batch_size: int, seed: int = 0):
        if num_items <= 0:
            raise ValueError("sampler: the train split is empty")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.cursor = 0  # items handed out so far

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=g)

    def next_batch(self, n: int | None = None) -> list[int]:
        n = self.batch_size if n is None else n
        out: list[int] = []
        while len(out) < n:
            epoch, pos = divmod(self.cursor, self.num_items)
            take = min(n - len(out), self.num_items - pos)
            out += self._perm(epoch)[pos : pos + take].tolist()
            self.cursor += take
        return out

    def update(self, group_ids: Tensor, stats: dict[str, Tensor]) -> None:
        """Uniform sampling ignores feedback."""

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])


class SECSampler:
    """Self-Evolving Curriculum (Chen et al. 2025, arXiv 2505.14970), a non-stationary bandit.

    One arm per category with value Q_c (initially 0). Each prompt of a batch comes from an arm drawn
    i.i.d. from P(c) = softmax(Q / tau), taking the next unused item of that arm's shuffled pool.
    After the step, r_c = mean over c's trained samples of |A_i| (the absolute advantage: how much
    the policy can still learn there), and Q_c <- (1 - alpha) Q_c + alpha r_c, where arms not sampled
    this step get r_c = 0 and so decay (as in the authors' code). Defaults: tau = 1, alpha = 0.5.
    """

    def __init__(self, categories: list, batch_size: int, seed: int = 0, tau: float = 1.0, alpha: float = 0.5):
        if not categories:
            raise ValueError("sampler: the train split is empty")
        self.batch_size, self.seed, self.tau, self.alpha = batch_size, seed, tau, alpha
        self.arms = sorted({str(c) for c in categories})
        self.pools = {a: [i for i, c in enumerate(categories) if str(c) == a] for a in self.arms}
        self.q = {a: 0.0 for a in self.arms}
        self.arm_cursor = {a: 0 for a in self.arms}  # items taken from each arm so far
        self.cursor = 0
        self.drawn: dict[int, str] = {}  # draw position -> arm, for positions not yet given feedback

    def probabilities(self) -> list[float]:
        z = [self.q[a] / self.tau for a in self.arms]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        return [v / sum(e) for v in e]

    def _item(self, arm: str) -> int:
        pool = self.pools[arm]
        epoch, pos = divmod(self.arm_cursor[arm], len(pool))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7919 + self.arms.index(arm))
        self.arm_cursor[arm] += 1
        return pool[int(torch.randperm(len(pool), generator=g)[pos])]

    def next_batch(self, n: int | None = None) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 104729 + self.cursor)
        picks = torch.multinomial(torch.tensor(self.probabilities()), self.batch_size if n is None else n,
                                  replacement=True, generator=g)
        out = []
        for k in picks.tolist():
            arm = self.arms[k]
            self.drawn[self.cursor] = arm
            out.append(self._item(arm))
            self.cursor += 1
        return out

    def update(self, group_ids: Tensor, stats: dict[str, Tensor]) -> None:
        adv = stats["advantages"].abs().double().cpu()
        per_arm: dict[str, list[float]] = defaultdict(list)
        for gid, a in zip(group_ids.tolist(), adv.tolist()):
            if int(gid) in self.drawn:
                per_arm[self.drawn[int(gid)]].append(a)
        for arm in self.arms:
            r = sum(per_arm[arm]) / len(per_arm[arm]) if per_arm[arm] else 0.0
            self.q[arm] = (1 - self.alpha) * self.q[arm] + self.alpha * r
        self.drawn.clear()

    def metrics(self) -> dict[str, float]:
        return {f"sampler/p[{a}]": p for a, p in zip(self.arms, self.probabilities())}

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "q": dict(self.q), "arm_cursor": dict(self.arm_cursor), "drawn": dict(self.drawn)}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
        self.q = {a: float(v) for a, v in state["q"].items()}
        self.arm_cursor = {a: int(v) for a, v in state["arm_cursor"].items()}
        self.drawn = {int(k): v for k, v in state["drawn"].items()}


def build_sampler(scfg, rows: list[dict], batch_size: int, seed: int):
    """The sampler named by the config's `sampler` section over the task's train rows."""
    if scfg.name == "uniform":
        return UniformSampler(len(rows), batch_size, seed)
    if scfg.name == "sec":
        missing = [i for i, r in enumerate(rows) if scfg.category_field not in r]
        if missing:
            raise ValueError(f"sampler.category_field: train row {missing[0]} has no field {scfg.category_field!r}")
        return SECSampler([r[scfg.category_field] for r in rows], batch_size, seed, scfg.tau, scfg.alpha)
    if scfg.name == "mixture":
        from shared.mixture import mixture_sampler_from_rows

        return mixture_sampler_from_rows(rows, scfg.source_field, scfg.weights, batch_size, seed)
    if scfg.name == "dots":
        from shared.dots import DOTSSampler

        return DOTSSampler(rows, batch_size, seed, scfg.dots_every, scfg.dots_reference, scfg.dots_rollouts,
                           scfg.dots_target, scfg.dots_select_tau, scfg.dots_attention_tau)
    raise ValueError(f"sampler.name: unknown sampler {scfg.name!r}")
