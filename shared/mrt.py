"""MRT: Meta Reinforcement Fine-Tuning (Qu et al. 2025, arXiv 2503.07572; METHODS.md B.9), `advantage: mrt`.

MRT splits a reasoning trace into episodes and rewards each episode for the *progress* it makes: how much
it raises the chance that a meta-prover mu, forced to answer right there, answers correctly. Its RL recipe
(CMU-AIRe/MRT, train/rl/README.md) replaces the group-mean baseline with the termination reward, the reward
of stopping at the prefix the rollout starts from. Each RL step, for every drawn prompt x:

1. prefix c: one trace sampled from pi_old (the policy before this step's update), cut after j of its
   episodes, j uniform over 0..k (k: the trace's episodes before its last one; an episode ends at
   `algorithm.step_delimiter`). The G rollouts continue c (the row's `prefill`): prefixes come from pi_old,
   as in MRT, and the first j episodes are not trained.
2. termination value J(c) = mean reward of `mrt_answers` answers forced right after c: `mrt_termination`
   appended, tokens containing an `mrt_answer_suppress` text banned, at most `mrt_answer_tokens` tokens.
3. progress of rollout i's first episode z_i: J(c + z_i) - J(c) (0 when the rollout answers at once).

    A_i = r_i - J(c) + alpha * (J(c + z_i) - J(c))        alpha = `algorithm.mrt_progress_coef`

With alpha = 0 this is the README's practical form. [APPROX: the paper's alpha was not retrieved; the
progress bonus is applied to the first new episode only, the one whose prefix mu has already scored.]

`mrt_extras` returns the per-sample `baseline` (J(c)) and `progress_bonus` (alpha * progress) that the pure
estimator `shared.advantages.mrt` combines.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from shared.rollout import Rollout, row_fields

# sample ids of MRT's extra generations (the counter-based noise keys on them): far above the rollout's
PREFIX_ID_BASE = 1 << 44
ANSWER_ID_BASE = 1 << 46


def episode_ends(text: str, delimiter: str) -> list[int]:
    """Offsets just after every `delimiter` that has more text after it: the ends of all episodes but the last."""
    out, i = [], text.find(delimiter)
    while i != -1 and i + len(delimiter) < len(text):
        out.append(i + len(delimiter))
        i = text.find(delimiter, i + len(delimiter))
    return out


def cut_prefix(trace: str, delimiter: str, rng: random.Random) -> str:
    """`trace` cut after a uniformly drawn number of its episodes (0 = nothing, up to all but the last)."""
    ends = [0] + episode_ends(trace, delimiter)
    return trace[: ends[rng.randrange(len(ends))]]


def first_episode(continuation: str, delimiter: str) -> str | None:
    """The first episode of `continuation` (up to and including its delimiter), or None when it has only one."""
    ends = episode_ends(continuation, delimiter)
    return continuation[: ends[0]] if ends else None


def suppressed_ids(tokenizer, texts: list[str]) -> list[int]:
    """Ids of the vocabulary tokens whose text contains one of `texts`."""
    if not texts:
        return []
    return [i for i in range(len(tokenizer)) if any(t in tokenizer.decode([i]) for t in texts)]


@torch.no_grad()
def mrt_prefixes(policy, rows: list[dict], cfg, first_group_id: int) -> list[dict]:
    """`rows` with a `prefill`: a prefix of one trace pi_old samples for each (step 1 above). Sample ids and the
    cut follow the prompts' global draw positions, so the prefixes do not depend on the process layout."""
    if not rows:
        return rows
    _, _, traces, _ = policy.generate(rows, 1, seed=cfg.seed, first_sample_id=PREFIX_ID_BASE + first_group_id)
    delim = cfg.algorithm.step_delimiter
    return [dict(row, prefill=cut_prefix(trace, delim, random.Random(cfg.seed * 1_000_003 + first_group_id + k)))
            for k, (row, trace) in enumerate(zip(rows, traces))]


@torch.no_grad()
def termination_values(policy, rows: list[dict], prefixes: list[str], reward_fn, cfg, step: int | None,
                       first_sample_id: int) -> Tensor:
    """J(c) for each (row, prefix c): the mean reward of the meta-prover's forced answers [len(rows)] float64."""
    a = cfg.algorithm
    if not rows:
        return torch.zeros(0, dtype=torch.float64)
    if not hasattr(policy, "_mrt_suppress"):
        policy._mrt_suppress = suppressed_ids(policy.tokenizer, a.mrt_answer_suppress)
    forced = [dict(r, prefill=c + a.mrt_termination) for r, c in zip(rows, prefixes)]
    M = a.mrt_answers
    _, mask, texts, _ = policy.generate(forced, M, seed=cfg.seed, first_sample_id=first_sample_id,
                                        max_new_tokens=a.mrt_answer_tokens, suppress=policy._mrt_suppress)
    rep = [dict(r, completion_length=int(n)) for r, n in zip([r for r in forced for _ in range(M)], mask.sum(-1).tolist())]
    return reward_fn(texts, row_fields(rep), step=step).total.double().reshape(len(rows), M).mean(-1)


def mrt_extras(policy, part: Rollout, reward_fn, cfg, step: int | None, first_sample_id: int) -> dict[str, Tensor]:
    """{"baseline": J(c), "progress_bonus": alpha (J(c + z_i) - J(c))} per sample of `part` (G samples per row,
    every sample's row carrying its group's prefix c as `prefill`)."""
    a = cfg.algorithm
    prefixes = [row.get("prefill", "") for row in part.rows]
    G = cfg.rollout.samples_per_prompt
    heads = list(range(0, len(part), G))  # one J(c) per group: its samples share the prefix
    M = a.mrt_answers
    j_prefix = termination_values(policy, [part.rows[i] for i in heads], [prefixes[i] for i in heads], reward_fn, cfg,
                                  step, ANSWER_ID_BASE + first_sample_id // G * M).repeat_interleave(G)
    progress = torch.zeros(len(part), dtype=torch.float64)
    if a.mrt_progress_coef:
        # every sample is scored (sample ids stay a function of its global index); those whose rollout answered
        # at once have no new episode and keep progress 0
        episodes = [first_episode(c[len(p):], a.step_delimiter) for c, p in zip(part.completions, prefixes)]
        j_after = termination_values(policy, part.rows, [p + (z or "") for p, z in zip(prefixes, episodes)], reward_fn,
                                     cfg, step, ANSWER_ID_BASE + (1 << 45) + first_sample_id * M)
        moved = torch.tensor([z is not None for z in episodes])
        progress = torch.where(moved, j_after - j_prefix, progress)
    return {"baseline": j_prefix.float(), "progress_bonus": (a.mrt_progress_coef * progress).float()}
