"""Estimators with per-sample extras (shared/advantages.py: remax, alol, expert_iteration, raft) and
`compute_advantages`' handling of extras (METHODS.md B.3, B.14). Hand values with the arithmetic in
comments, plus a python-loop reference for RAFT.
"""

from __future__ import annotations

import pytest
import torch

from shared.advantages import alol, compute_advantages, expert_iteration, raft, remax
from shared.rollout import first_in_group

F64 = torch.float64


def _t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


# ------------------------------------------------------------------------------------- remax / alol
def test_remax_is_reward_minus_greedy_baseline():
    # r - b: 1 - 0.5 = 0.5;  0.5 - 0.5 = 0;  0 - 1 = -1;  2 - 1 = 1
    r, g = _t([1.0, 0.5, 0.0, 2.0]), torch.tensor([0, 0, 1, 1])
    b = _t([0.5, 0.5, 1.0, 1.0], torch.float32)
    out = remax(r, g, baseline=b)
    torch.testing.assert_close(out, _t([0.5, 0.0, -1.0, 1.0]))
    assert out.dtype == F64
    torch.testing.assert_close(compute_advantages("remax", r, g, baseline=b), _t([0.5, 0.0, -1.0, 1.0]))


def test_alol_clamps_at_zero():
    # max(r - V, 0): 1 - 0.25 = 0.75;  0 - 0.25 -> 0;  0.5 - 0.5 = 0;  0.2 - 0.9 -> 0;  3 - 1 = 2
    r, g = _t([1.0, 0.0, 0.5, 0.2, 3.0]), torch.tensor([0, 0, 1, 1, 2])
    v = _t([0.25, 0.25, 0.5, 0.9, 1.0])
    out = alol(r, g, baseline=v)
    torch.testing.assert_close(out, _t([0.75, 0.0, 0.0, 0.0, 2.0]))
    assert bool((out >= 0).all())
    torch.testing.assert_close(compute_advantages("alol", r, g, baseline=v), out)
    # float32 rewards keep their dtype
    assert alol(r.float(), g, baseline=v).dtype == torch.float32


# ----------------------------------------------------------------------------------- expert iteration
#   position:    0    1    2    3    4    5    6
#   group:       0    0    0    0    1    1    1
#   text:       "a"  "a"  "b"  "c"  "a"  "b"  "d"
#   reward:      1    1    0    1    1   0.5   0.9
#   unique:      1    0    1    1    1    1    1    (a duplicate "a" in group 0; "a" in group 1 is new there)
#   verified (r > 0.5): 1 1 0 1 1 0 1   (0.5 is NOT > 0.5)
#   kept = verified & unique: 1 0 0 1 1 0 1
EI_TEXT = ["a", "a", "b", "c", "a", "b", "d"]
EI_GIDS = torch.tensor([0, 0, 0, 0, 1, 1, 1])
EI_REWARDS = _t([1.0, 1.0, 0.0, 1.0, 1.0, 0.5, 0.9])
EI_UNIQUE = _t([1, 0, 1, 1, 1, 1, 1], torch.float32)


def test_first_in_group_flags_match_hand():
    torch.testing.assert_close(first_in_group(EI_TEXT, EI_GIDS), EI_UNIQUE)


def test_expert_iteration_keeps_verified_unique_only():
    out = expert_iteration(EI_REWARDS, EI_GIDS, unique=EI_UNIQUE, threshold=0.5)
    torch.testing.assert_close(out, _t([1, 0, 0, 1, 1, 0, 1]))
    # through compute_advantages with the rollout's flags (and the loop's explicit threshold)
    out = compute_advantages("expert_iteration", EI_REWARDS, EI_GIDS, unique=first_in_group(EI_TEXT, EI_GIDS),
                             threshold=0.5)
    torch.testing.assert_close(out, _t([1, 0, 0, 1, 1, 0, 1]))
    # threshold 0.4: the 0.5 at position 5 now counts
    out = compute_advantages("expert_iteration", EI_REWARDS, EI_GIDS, unique=EI_UNIQUE, threshold=0.4)
    torch.testing.assert_close(out, _t([1, 0, 0, 1, 1, 1, 1]))


def test_expert_iteration_default_threshold_through_compute_advantages():
    # threshold has a default (0.5) in the estimator; compute_advantages does not demand it
    out = compute_advantages("expert_iteration", EI_REWARDS, EI_GIDS, unique=EI_UNIQUE)
    torch.testing.assert_close(out, _t([1, 0, 0, 1, 1, 0, 1]))


# ---------------------------------------------------------------------------------------------- RAFT
def _raft_loop(rewards, gids):
    """1 for the first max-reward sample of each group (python loop)."""
    best: dict = {}
    for i, (r, g) in enumerate(zip(rewards, gids)):
        if g not in best or r > rewards[best[g]]:
            best[g] = i
    chosen = set(best.values())
    return [1.0 if i in chosen else 0.0 for i in range(len(rewards))]


def test_raft_first_best_per_group_hand():
    #   group 3 (pos 0,2,4): rewards 0.9, 0.9, 0.1 -> tie, first best = pos 0
    #   group 7 (pos 1,3,5): rewards 0, 0, 0       -> all zero, first = pos 1
    #   group 9 (pos 6,7):   rewards -1, 0.5        -> pos 7
    r = _t([0.9, 0.0, 0.9, 0.0, 0.1, 0.0, -1.0, 0.5])
    g = torch.tensor([3, 7, 3, 7, 3, 7, 9, 9])
    out = raft(r, g)
    torch.testing.assert_close(out, _t([1, 1, 0, 0, 0, 0, 0, 1]))
    torch.testing.assert_close(compute_advantages("raft", r, g), out)


def test_raft_all_zero_rewards_picks_first_of_each_group():
    r = torch.zeros(6, dtype=F64)
    g = torch.tensor([5, 5, 5, 2, 2, 2])
    torch.testing.assert_close(raft(r, g), _t([1, 0, 0, 1, 0, 0]))
    assert raft(r.float(), g).dtype == torch.float32


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_raft_exactly_one_per_group_against_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    gids = torch.randint(0, 5, (30,), generator=gen)
    rewards = torch.randint(0, 3, (30,), generator=gen).to(F64)  # many ties
    out = raft(rewards, gids)
    torch.testing.assert_close(out, _t(_raft_loop(rewards.tolist(), gids.tolist())))
    for gid in gids.unique().tolist():
        assert out[gids == gid].sum().item() == 1.0


# ------------------------------------------------------------------------------- compute_advantages
def test_compute_advantages_missing_extra_raises_naming_it():
    r, g = _t([1.0, 0.0]), torch.tensor([0, 0])
    with pytest.raises(ValueError, match="'remax'.*baseline"):
        compute_advantages("remax", r, g)
    with pytest.raises(ValueError, match="'alol'.*baseline"):
        compute_advantages("alol", r, g, unique=_t([1, 1]))
    with pytest.raises(ValueError, match="'expert_iteration'.*unique"):
        compute_advantages("expert_iteration", r, g, threshold=0.5, baseline=_t([0, 0]))


def test_compute_advantages_ignores_unneeded_extras():
    r, g = _t([1.0, 0.0, 0.5, 0.5]), torch.tensor([0, 0, 1, 1])
    extras = {"baseline": _t([0.5, 0.5, 0.0, 1.0]), "unique": _t([1, 1, 1, 0]), "threshold": 0.4,
              "something_else": "ignored"}
    # remax: 0.5, -0.5, 0.5, -0.5
    torch.testing.assert_close(compute_advantages("remax", r, g, **extras), _t([0.5, -0.5, 0.5, -0.5]))
    # expert_iteration (threshold 0.4): verified 1 0 1 1, unique 1 1 1 0 -> 1 0 1 0
    torch.testing.assert_close(compute_advantages("expert_iteration", r, g, **extras), _t([1, 0, 1, 0]))
    # raft: group 0 -> pos 0; group 1 tie -> pos 2
    torch.testing.assert_close(compute_advantages("raft", r, g, **extras), _t([1, 0, 1, 0]))
    # group estimators take no extras: dr_grpo 0.5, -0.5, 0, 0
    torch.testing.assert_close(compute_advantages("dr_grpo", r, g, **extras), _t([0.5, -0.5, 0.0, 0.0]))


# ---------------------------------------------------------------------------------------------
# per_step (per-step credit on incorrect answers)
# ---------------------------------------------------------------------------------------------
def test_per_step_hand_case():
    from shared.advantages import per_step

    nan = float("nan")
    rewards = torch.tensor([0.0, 1.0])
    groups = torch.tensor([0, 0])  # V_0 = mean(0, 1) = 0.5
    values = torch.tensor([[0.5, 0.25, 0.0, nan],   # incorrect, 3 tokens, a value after each
                           [nan, 1.0, nan, nan]])   # correct, 2 tokens: only its own reward
    adv = per_step(rewards, groups, step_values=values)
    # row 0: 0.5 - 0.5 = 0, 0.25 - 0.5 = -0.25, 0 - 0.25 = -0.25, padding 0; row 1: 1 - 0.5 on both tokens
    torch.testing.assert_close(adv, torch.tensor([[0.0, -0.25, -0.25, 0.0], [0.5, 0.5, 0.0, 0.0]]))
    # the steps of an answer add up to its outcome advantage r - V_0
    assert float(adv[0].sum()) == -0.5


def test_per_step_multi_token_steps_share_their_step_advantage():
    from shared.advantages import per_step

    nan = float("nan")
    values = torch.tensor([[nan, 0.75, nan, nan, 0.0]])  # steps: tokens 0-1 (value 0.75), tokens 2-4 (reward 0)
    adv = per_step(torch.tensor([0.0]), torch.tensor([7]), step_values=values)  # a group of one: V_0 = 0
    torch.testing.assert_close(adv, torch.tensor([[0.75, 0.75, -0.75, -0.75, -0.75]]))


def test_step_ends_by_delimiter_and_every_token():
    from shared.step_values import step_ends

    assert step_ends(["1", "\n", "2", "3"], 4, "\n") == [2]
    assert step_ends(["1", "2", "3"], 3, "") == [1, 2]
    assert step_ends(["x"], 1, "") == []
