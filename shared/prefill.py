"""Mixed-CoT-RL: RL on prompts whose response starts with flawed reasoning (METHODS.md B.7-B.23 list;
"Can Large Reasoning Models Improve Accuracy on Mathematical Tasks Using Flawed Thinking?", 2026).

The paper fine-tunes with GRPO and a binary final-answer reward on a mix of clean problems and problems
prefilled with a chain-of-thought prefix that carries exactly one controlled error: a calculation error
(a wrong result) or a reasoning error (a misapplied rule). The model has to notice and recover. Clean-only
RL makes models more susceptible to misleading prefills; the mix keeps clean accuracy and gains robustness.

`rollout.prefill: flawed` gives a share `rollout.prefill_frac` of the train rows a `prefill` (the start of
the response, written for the model; the policy continues it and only the continuation is trained) from
`task.flawed_prefix(row, kind, rng)`, with the kind drawn uniformly from `rollout.prefill_errors`. The
choice is a pure function of (seed, row index), so every process and every resume sees the same data.
Robustness is measured on a held-out split of prefilled problems (`eval.extra_splits`, e.g. the arithmetic
scratchpad's `eval_flawed`). [APPROX: no authors' code; error kinds as the abstract describes them.]
"""

from __future__ import annotations

import random


def with_flawed_prefixes(task, rows: list[dict], frac: float, kinds: list[str], seed: int) -> list[dict]:
    """`rows`, each given a one-error `prefill` with probability `frac` (the others unchanged)."""
    if not hasattr(task, "flawed_prefix"):
        raise ValueError(f"rollout.prefill: flawed: task {type(task).__name__} has no flawed_prefix(row, kind, rng) "
                         "to write an error-injected prefix")
    out = []
    for i, row in enumerate(rows):
        rng = random.Random(seed * 1_000_003 + i)
        if rng.random() < frac:
            row = dict(row, prefill=task.flawed_prefix(row, rng.choice(kinds), rng))
        out.append(row)
    return out
