"""Samplers: uniform epochs, the SEC bandit's TD(0) update and Boltzmann draws, exact state round trips."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from shared.sampler import SECSampler, UniformSampler


def test_uniform_covers_every_item_once_per_epoch_and_resumes():
    s = UniformSampler(10, 4, seed=1)
    first = s.next_batch() + s.next_batch() + s.next_batch()[:2]  # 10 items = one epoch
    assert sorted(first) == list(range(10))
    s2 = UniformSampler(10, 4, seed=1)
    s2.load_state_dict(s.state_dict())
    assert s.next_batch() == s2.next_batch()


def test_sec_td_update_by_hand():
    # arms: a (items 0,1), b (items 2,3), c (items 4,5); alpha = 0.5, Q starts at 0
    s = SECSampler(["a", "a", "b", "b", "c", "c"], batch_size=2, seed=0, alpha=0.5)
    s.drawn = {0: "a", 1: "b"}  # the last step drew one prompt from a and one from b
    s.cursor = 2
    # samples of group 0 (arm a): |A| = 1.0, 0.5 -> r_a = 0.75; group 1 (arm b): |A| = 0.2, 0.2 -> r_b = 0.2
    s.update(torch.tensor([0, 0, 1, 1]), {"advantages": torch.tensor([1.0, -0.5, 0.2, -0.2])})
    assert s.q == pytest.approx({"a": 0.375, "b": 0.1, "c": 0.0})  # Q <- 0.5*0 + 0.5*r
    # next step only arm a is sampled, |A| = 0.25: Q_a = 0.5*0.375 + 0.5*0.25 = 0.3125; b decays to 0.05
    s.drawn = {2: "a"}
    s.update(torch.tensor([2, 2]), {"advantages": torch.tensor([0.25, -0.25])})
    assert s.q == pytest.approx({"a": 0.3125, "b": 0.05, "c": 0.0})
    assert not s.drawn


def test_sec_probabilities_are_boltzmann_and_draws_follow_them():
    s = SECSampler(["x"] * 50 + ["y"] * 50, batch_size=4000, seed=3, tau=0.5)
    s.q = {"x": 0.6, "y": 0.1}
    p = s.probabilities()
    # softmax([1.2, 0.2]) = [e^1 / (e^1 + 1), 1 / (e^1 + 1)]
    assert p == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)])
    items = s.next_batch()
    counts = Counter("x" if i < 50 else "y" for i in items)
    assert counts["x"] / 4000 == pytest.approx(p[0], abs=0.03)


def test_sec_items_come_from_the_drawn_arm_without_replacement_within_an_epoch():
    cats = ["a"] * 5 + ["b"] * 7
    s = SECSampler(cats, batch_size=3, seed=2)
    s.q = {"a": 50.0, "b": 0.0}  # effectively always arm a
    items = s.next_batch() + s.next_batch()[:2]
    assert sorted(items) == [0, 1, 2, 3, 4]


def test_sec_state_round_trip_continues_exactly():
    cats = [f"c{i % 4}" for i in range(40)]
    a = SECSampler(cats, batch_size=6, seed=5)
    a.next_batch()
    a.update(torch.arange(6).repeat_interleave(2), {"advantages": torch.linspace(-1, 1, 12)})
    b = SECSampler(cats, batch_size=6, seed=5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(3):
        assert a.next_batch() == b.next_batch()
        ids = torch.arange(a.cursor - 6, a.cursor).repeat_interleave(2)
        adv = torch.randn(12)
        a.update(ids, {"advantages": adv})
        b.update(ids, {"advantages": adv})
        assert a.q == b.q


def test_sec_in_the_loop_logs_arm_probabilities(tmp_path):
    from shared.config import validate_config
    from shared.loop import train
    from tests.helpers.tiny import tiny_config_dict

    d = tiny_config_dict(tmp_path, sampler={"name": "sec", "tau": 0.4}, train={"steps": 2})
    train(validate_config(d, "test"))
    rows = [json.loads(l) for l in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in rows if "loss" in r][-1]
    probs = [v for k, v in step.items() if k.startswith("sampler/p[carries=")]
    assert len(probs) >= 2 and sum(probs) == pytest.approx(1.0)
