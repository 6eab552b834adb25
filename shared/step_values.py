"""Monte Carlo values of the steps of incorrect answers, for per-step credit (`advantage: per_step`).

Setlur et al. 2024 ("RL on Incorrect Synthetic Data Scales the Efficiency of LLM Math Reasoning by
Eight-Fold", arXiv 2406.14532) show that negatives help when training can recover the advantage of
each intermediate step, and that this per-step scheme is advantage-weighted RL. [APPROX: from the
abstract; the value estimate is the paper's Monte Carlo rollout scheme as we understand it.]

For an incorrect completion (reward <= `algorithm.positive_threshold`), each step end c (a token whose
text contains `algorithm.step_delimiter`; every token when it is empty) gets the value

    V(prefix_{<=c}) = mean reward of `algorithm.step_rollouts` completions sampled from the prompt + prefix

and the last token gets the completion's own reward. Correct completions get only that last value.
`step_values` returns these as a [B, T] tensor with NaN at the other positions; the pure estimator
`shared.advantages.per_step` turns them into per-token advantages.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from shared.rollout import Rollout, row_fields

# sample ids of the continuations live far above those of the rollout (which are < 2**40 in practice)
CONTINUATION_ID_BASE = 1 << 48


def step_ends(token_texts: list[str], length: int, delimiter: str) -> list[int]:
    """Cuts c in [1, length - 1] after which a step ends (token c - 1 contains the delimiter)."""
    return [c for c in range(1, length) if not delimiter or delimiter in token_texts[c - 1]]


@torch.no_grad()
def step_values(policy, batch: Rollout, rewards: Tensor, reward_fn, cfg, step: int | None) -> Tensor:
    a = cfg.algorithm
    if not hasattr(policy, "continue_completions"):
        raise ValueError("advantage 'per_step' needs a policy that can continue a completion from a prefix "
                         "(text policies: llm_rl.policy.CausalLMPolicy)")
    B, T = batch.mask.shape
    lengths = batch.mask.sum(-1).tolist()
    values = torch.full((B, T), math.nan, dtype=torch.float64)
    cuts: dict[int, list[int]] = {}  # cut -> samples to continue from there
    ids = batch.inputs["input_ids"][:, -T:].tolist()
    for i in range(B):
        n = int(lengths[i])
        if n == 0:
            continue
        values[i, n - 1] = float(rewards[i])
        if float(rewards[i]) > a.positive_threshold:
            continue
        texts = [policy.tokenizer.decode([t]) for t in ids[i][:n]] if a.step_delimiter else []
        for c in step_ends(texts, n, a.step_delimiter):
            cuts.setdefault(c, []).append(i)
    M = a.step_rollouts
    first_id = CONTINUATION_ID_BASE + (step or 0) * (1 << 24)
    for c, index in sorted(cuts.items()):
        texts, lengths = policy.continue_completions(batch, index, c, M, seed=cfg.seed, first_sample_id=first_id)
        first_id += len(texts)
        rows = [dict(batch.rows[i], completion_length=n) for i, n in zip([i for i in index for _ in range(M)], lengths)]
        scores = reward_fn(texts, row_fields(rows), step=step).total.double().reshape(len(index), M).mean(-1)
        values[index, c - 1] = scores
    return values
