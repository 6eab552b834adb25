"""Prompt samplers. A sampler yields indices into the task's `train` split, one batch per RL step.

`UniformSampler` walks seeded permutations epoch by epoch; its whole state is a cursor, so it
checkpoints and resumes exactly. Curriculum samplers (later) take per-prompt statistics back
through `update(indices, stats)` after each step.
"""

from __future__ import annotations

import torch


class UniformSampler:
    def __init__(self, num_items: int, batch_size: int, seed: int = 0):
        if num_items <= 0:
            raise ValueError("sampler: the train split is empty")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.cursor = 0  # items handed out so far

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=g)

    def next_batch(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            epoch, pos = divmod(self.cursor, self.num_items)
            take = min(self.batch_size - len(out), self.num_items - pos)
            out += self._perm(epoch)[pos : pos + take].tolist()
            self.cursor += take
        return out

    def update(self, indices: list[int], stats: dict) -> None:
        """Uniform sampling ignores feedback."""

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
