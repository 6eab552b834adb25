"""Two-attempt rollouts and SCoRe's two training stages (Kumar et al. 2024, arXiv 2409.12917; METHODS.md B.10).

With `rollout.attempts: 2` every first answer y1 ~ pi(.|x) gets one second attempt
y2 ~ pi(.|x2), where x2 = `rollout.revision_template` filled with the prompt and y1 (the model sees
its own answer and answers again). Both attempts are trained samples: the second attempts of one
prompt form their own group (group id + ATTEMPT2_GROUP), so group baselines compare second attempts
with second attempts. The rollout carries per-sample `attempt` (1 or 2), `pg_weight` (the sample's
policy-gradient term is multiplied by it) and `kl_coef` (its own KL-to-reference coefficient,
replacing `algorithm.beta` in `ppo_clip`):

  stage I  (RL steps <= algorithm.score_stage1_steps): maximise r(y2) - beta2 KL(pi(.|x) || ref) on the
           first attempt only: y1 has no reward term (pg_weight 0) and kl_coef beta2
           (`algorithm.first_attempt_beta`), y2 has pg_weight 1 and no KL;
  stage II: both attempts are rewarded, y2 with the bonus alpha (r(y2) - r(y1))
           (`algorithm.correction_bonus`), both with kl_coef beta1 (`algorithm.beta`).

Values from the paper / reimplementation: beta1 0.01, beta2 0.1, alpha 10. Held-out evaluation
reports both attempts (shared/evaluate.py `revision_template`): accuracy@t1, accuracy@t2 and their
difference, with the fractions of incorrect->correct and correct->incorrect revisions.

CORY (Ma et al. 2024, METHODS.md B.21; `rollout.agents: 2`, llm_rl/cory.py) reuses all of this with two
changes: the second attempt is sampled by the other copy of the model (`policy.observer`, which sees the
pioneer's answer through the same template), and every sample of both agents gets the collective reward
r(y1) + r(y2) (`collective_reward`) with stage-II weights (pg_weight 1, kl_coef beta: each agent's own
KL to the reference), no stages and no bonus.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shared.rollout import Rollout

ATTEMPT2_GROUP = 1 << 40  # second attempts' group ids (and sample ids) live above every first attempt's


def revision_row(row: dict, completion: str, template: str) -> dict:
    """The second-attempt prompt row: `template` with {prompt} and {completion} filled in."""
    out = {k: v for k, v in row.items() if k != "completion_length"}
    out["prompt"] = template.format(prompt=row["prompt"], completion=completion)
    return out


def score_weights(stage: int, attempt: Tensor, beta: float, first_attempt_beta: float) -> tuple[Tensor, Tensor]:
    """(pg_weight, kl_coef) per sample for SCoRe stage 1 or 2; `attempt` holds 1.0 / 2.0 per sample."""
    first = attempt == 1
    if stage == 1:
        return (~first).float(), torch.where(first, first_attempt_beta, 0.0).float()
    return torch.ones_like(attempt), torch.full_like(attempt, beta)


def correction_bonus(r1: Tensor, r2: Tensor, alpha: float) -> Tensor:
    """Stage II reward of a second attempt: r2 + alpha (r2 - r1) (the bonus for turning wrong into right)."""
    return r2 + alpha * (r2 - r1)


def collective_reward(r1: Tensor, r2: Tensor) -> Tensor:
    """CORY's collective reward r = R(x, y1) + R(x, y2), given to the pioneer's and the observer's sample alike."""
    return r1 + r2


def two_attempts(policy, first: Rollout, reward_fn, cfg, step: int, first_sample_id: int) -> tuple[Rollout, object]:
    """`first` (scored first attempts) + one second attempt per sample, with the extras above; also the
    reward result of the second attempts (for failure counts)."""
    a, r = cfg.algorithm, cfg.rollout
    rows2 = [revision_row(row, c, r.revision_template) for row, c in zip(first.rows, first.completions)]
    answers_second = policy.observer if r.agents == 2 else policy  # CORY: the other agent; SCoRe: the policy itself
    second = answers_second.sample(rows2, 1, seed=cfg.seed, first_sample_id=ATTEMPT2_GROUP + first_sample_id,
                                   first_group_id=0)
    second.group_ids = first.group_ids.to(second.group_ids.device) + ATTEMPT2_GROUP
    res = reward_fn(second.completions, second.fields(), step=step)
    r1, r2 = first.rewards.double().cpu(), res.total.double().cpu()
    if r.agents == 2:  # CORY: no stages; both agents' samples get r1 + r2
        stage = 2
        first.rewards = second.rewards = collective_reward(r1, r2).to(res.total.dtype)
    else:
        stage = 1 if step is not None and step <= a.score_stage1_steps else 2
        second.rewards = correction_bonus(r1, r2, a.correction_bonus).to(res.total.dtype) if stage == 2 else res.total
    second.components = {k: v for k, v in res.components.items()}
    for part, k in ((first, 1.0), (second, 2.0)):
        part.extras = {**part.extras, "attempt": torch.full((len(part),), k)}
        part.extras["pg_weight"], part.extras["kl_coef"] = score_weights(stage, part.extras["attempt"], a.beta,
                                                                         a.first_attempt_beta)
    second.extras = {k: v for k, v in second.extras.items() if k in first.extras}
    first.extras = {k: v for k, v in first.extras.items() if k in second.extras}
    return Rollout.cat([first, second]), res
