"""Held-out evaluation: greedy completions scored by the task's metric, sharded over processes."""

from __future__ import annotations

import torch


@torch.no_grad()
def evaluate(policy, task, split: str, max_prompts: int, batch_size: int, accelerator=None) -> dict[str, float]:
    rows = task.split(split)[:max_prompts]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = rows[rank::world]
    scores: list[float] = []
    for s in range(0, len(mine), batch_size):
        batch = mine[s : s + batch_size]
        completions = policy.complete(batch)
        scores += task.score(completions, batch)
    if accelerator is not None and world > 1:
        from accelerate.utils import gather_object

        scores = gather_object(scores)
    n = len(scores)
    return {task.metric: sum(scores) / max(n, 1), "n": float(n)}
