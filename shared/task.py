"""The task contract: data splits plus the held-out metric, for every domain.

A task is any object with

    metric: str                    # name of the held-out metric reported in summary.json
    higher_is_better: bool
    split(name) -> list[dict]      # "train" (RL prompts), "sft" (demonstrations: prompt + completion),
                                   # "val" (model selection during warm-up), "eval" (held-out report)
    score(completions, rows) -> list[float]   # per-sample held-out metric

Rows are plain dicts; their keys are the fields reward functions receive.
"""

from __future__ import annotations

from typing import Protocol


class Task(Protocol):
    metric: str
    higher_is_better: bool

    def split(self, name: str) -> list[dict]: ...

    def score(self, completions: list, rows: list[dict]) -> list[float]: ...


SPLITS = ("train", "sft", "val", "eval")
