"""DDPO per-prompt reward tracker and advantage clipping (shared/advantages.py, METHODS.md D.2).

Hand-computed values with the arithmetic in comments. std is the POPULATION std (ddof 0).
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from shared.advantages import PerPromptTracker, clip_advantages

F64 = torch.float64
EPS = 1e-6


def _t(x):
    return torch.tensor(x, dtype=F64)


def test_batch_stats_branch_then_buffer_branch():
    tr = PerPromptTracker(buffer_size=4, min_count=3, eps=EPS)
    # batch 1: a -> [1, 3], b -> [2, 6]; both buffers hold 2 < 3 rewards -> whole-batch stats
    # batch mean = (1+3+2+6)/4 = 3; population var = (4 + 0 + 1 + 9)/4 = 3.5; std = sqrt(3.5)
    adv = tr(["a", "a", "b", "b"], _t([1.0, 3.0, 2.0, 6.0]))
    s = math.sqrt(3.5) + EPS
    torch.testing.assert_close(adv, _t([-2 / s, 0.0, -1 / s, 3 / s]), rtol=0, atol=1e-12)
    assert tr.stats() == {"tracked_prompts": 2}

    # batch 2: keys a, a, b, c  rewards 5, 7, 7, 1
    #   a: buffer [1, 3, 5, 7] (4 >= 3) -> mean 4, var (9+1+1+9)/4 = 5 -> A = (1, 3)/sqrt(5)
    #   b: buffer [2, 6, 7] (3 >= 3)    -> mean 5, var (9+1+4)/3 = 14/3 -> A = 2/sqrt(14/3)
    #   c: buffer [1] (1 < 3)           -> batch stats of [5, 7, 7, 1]: mean 5,
    #                                      var (0+4+4+16)/4 = 6 -> A = -4/sqrt(6)
    adv = tr(["a", "a", "b", "c"], _t([5.0, 7.0, 7.0, 1.0]))
    sa, sb, sc = math.sqrt(5) + EPS, math.sqrt(14 / 3) + EPS, math.sqrt(6) + EPS
    torch.testing.assert_close(adv, _t([1 / sa, 3 / sa, 2 / sb, -4 / sc]), rtol=0, atol=1e-12)
    assert tr.stats() == {"tracked_prompts": 3}


def test_rewards_are_appended_before_the_min_count_check():
    # min_count 2: a's two rewards of THIS batch already fill its buffer to 2 -> buffer stats
    #   a: [1, 3] mean 2, pop std 1 -> A = (-1, 1)/(1+eps)
    #   b: [10] 1 < 2 -> batch stats of [1, 3, 10]: mean 14/3,
    #      var ((1-14/3)^2 + (3-14/3)^2 + (10-14/3)^2)/3 = (121/9 + 25/9 + 256/9)/3 = 402/27
    #      A_b = (10 - 14/3)/sqrt(402/27) = (16/3)/sqrt(402/27)
    tr = PerPromptTracker(buffer_size=8, min_count=2, eps=EPS)
    adv = tr(["a", "a", "b"], _t([1.0, 3.0, 10.0]))
    expected = [-1 / (1 + EPS), 1 / (1 + EPS), (16 / 3) / (math.sqrt(402 / 27) + EPS)]
    torch.testing.assert_close(adv, _t(expected), rtol=0, atol=1e-12)


def test_interleaved_keys_keep_positions():
    # same numbers as the first batch above, keys interleaved: a, b, a, b with rewards 1, 2, 3, 6
    tr = PerPromptTracker(buffer_size=4, min_count=1, eps=EPS)
    # min_count 1: buffer branch. a: [1, 3] mean 2 std 1; b: [2, 6] mean 4 std 2
    adv = tr(["a", "b", "a", "b"], _t([1.0, 2.0, 3.0, 6.0]))
    torch.testing.assert_close(
        adv, _t([-1 / (1 + EPS), -2 / (2 + EPS), 1 / (1 + EPS), 2 / (2 + EPS)]), rtol=0, atol=1e-12
    )


def test_buffer_eviction_at_maxlen():
    tr = PerPromptTracker(buffer_size=3, min_count=1, eps=EPS)
    tr(["a", "a", "a"], _t([1.0, 2.0, 3.0]))
    assert list(tr.buffers["a"]) == [1.0, 2.0, 3.0]
    # appending 10 evicts the oldest (1): buffer [2, 3, 10], mean 5,
    # pop var (9 + 4 + 25)/3 = 38/3 -> A = (10 - 5)/sqrt(38/3)
    adv = tr(["a"], _t([10.0]))
    assert list(tr.buffers["a"]) == [2.0, 3.0, 10.0]
    torch.testing.assert_close(adv, _t([5 / (math.sqrt(38 / 3) + EPS)]), rtol=0, atol=1e-12)
    # a batch larger than the buffer keeps only the newest buffer_size rewards
    tr(["a"] * 5, _t([4.0, 5.0, 6.0, 7.0, 8.0]))
    assert list(tr.buffers["a"]) == [6.0, 7.0, 8.0]


def test_state_round_trip_gives_identical_advantages():
    g = torch.Generator().manual_seed(0)
    keys = ["p0", "p1", "p2"]
    a = PerPromptTracker(buffer_size=5, min_count=4, eps=EPS)
    for _ in range(3):
        ks = [keys[i % 3] for i in range(6)]
        a(ks, torch.randn(6, generator=g, dtype=F64))
    state = pickle.loads(pickle.dumps(a.state_dict()))
    assert all(type(v) is list for v in state["buffers"].values())
    assert all(type(x) is float for v in state["buffers"].values() for x in v)
    b = PerPromptTracker(buffer_size=5, min_count=4, eps=EPS)
    b.load_state_dict(state)
    assert b.stats() == a.stats() == {"tracked_prompts": 3}
    nxt_keys = ["p0", "p1", "p3", "p0"]
    nxt = torch.randn(4, generator=g, dtype=F64)
    torch.testing.assert_close(b(nxt_keys, nxt), a(nxt_keys, nxt), rtol=0, atol=0)
    # and the states stay equal afterwards
    assert b.state_dict() == a.state_dict()


def test_output_dtype_and_shape_follow_rewards():
    tr = PerPromptTracker(buffer_size=4, min_count=1)
    out = tr(["x", "x"], torch.tensor([0.0, 1.0], dtype=torch.float32))
    assert out.dtype == torch.float32 and out.shape == (2,)
    with pytest.raises(ValueError):
        tr(["x"], torch.tensor([0.0, 1.0]))


def test_constant_rewards_give_zero_advantage():
    tr = PerPromptTracker(buffer_size=4, min_count=2)
    adv = tr(["a", "a", "b", "b"], _t([2.0, 2.0, 2.0, 2.0]))
    torch.testing.assert_close(adv, torch.zeros(4, dtype=F64), rtol=0, atol=0)


def test_clip_advantages():
    adv = _t([-7.0, -5.0, -1.0, 0.0, 4.9, 5.0, 12.0])
    assert clip_advantages(adv, None) is adv
    torch.testing.assert_close(clip_advantages(adv, 5.0), _t([-5.0, -5.0, -1.0, 0.0, 4.9, 5.0, 5.0]))
    torch.testing.assert_close(clip_advantages(adv, 1.0), _t([-1.0, -1.0, -1.0, 0.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError):
        clip_advantages(adv, 0.0)
