"""DAPO dynamic sampling: zero-variance groups are dropped and refilled, up to max_gen_batches."""

from __future__ import annotations

import json

import torch

import shared.loop as loop
from shared.config import validate_config
from shared.rewards import REWARDS
from tests.helpers.tiny import tiny_config_dict


def _parity_reward():
    """Constant 0 for prompts whose first operand is odd; varies within the group otherwise."""
    def reward(completions, prompt, **_):
        return [0.0 if int(p.split("+")[0]) % 2 else float(len(c) % 2) for c, p in zip(completions, prompt)]
    return reward


REWARDS.setdefault("test_parity", _parity_reward)


def _run(tmp_path, monkeypatch, rewards, **over):
    batches = []
    real = loop.collect_rollout

    def spy(*a, **k):
        out = real(*a, **k)
        batches.append(out)
        return out

    monkeypatch.setattr(loop, "collect_rollout", spy)
    d = tiny_config_dict(tmp_path, rewards=rewards, **over)
    loop.train(validate_config(d, "test"))
    rows = [json.loads(l) for l in (tmp_path / "runs" / d["name"] / "metrics.jsonl").read_text().splitlines()]
    return batches, [r for r in rows if "loss" in r]


def test_rollout_cat_repads_and_keeps_log_probs(tmp_path):
    from llm_rl.policy import CausalLMPolicy
    from llm_rl.tasks.arithmetic import ArithmeticTaskConfig, build_model, build_tokenizer
    from shared.rollout import Rollout

    tok = build_tokenizer()
    torch.manual_seed(0)
    policy = CausalLMPolicy(build_model(ArithmeticTaskConfig(hidden_size=32, num_layers=1, num_heads=2), tok), tok,
                            max_new_tokens=5)
    a = policy.sample([{"prompt": "1+2="}, {"prompt": "30+4="}], 2, seed=0, first_sample_id=0, first_group_id=0)
    b = policy.sample([{"prompt": "123+456="}], 3, seed=1, first_sample_id=9, first_group_id=7)
    both = Rollout.cat([a, b])
    assert len(both) == 7 and both.group_ids.tolist() == [0, 0, 1, 1, 7, 7, 7]
    assert both.completions == a.completions + b.completions
    with torch.no_grad():
        lp = policy.log_probs(both)[0]
        for part, rows in ((a, slice(0, 4)), (b, slice(4, 7))):
            T = part.mask.shape[1]
            torch.testing.assert_close(lp[rows, :T], policy.log_probs(part)[0], atol=1e-5, rtol=0)
            assert not lp[rows, T:].any()


def test_dynamic_sampling_refills_with_informative_groups(tmp_path, monkeypatch):
    batches, steps = _run(tmp_path, monkeypatch, [{"name": "test_parity"}],
                          rollout={"dynamic_sampling": True, "max_gen_batches": 10}, train={"steps": 2})
    for batch, drawn, info in batches:
        operands = [int(r["prompt"].split("+")[0]) for r in batch.rows]
        assert all(o % 2 == 0 for o in operands)  # every trained group is informative
        assert len(batch) == 16 and bool(batch.mask.sum(-1).gt(0).all())
        assert len(drawn) == 4 * info["gen_batches"]
    assert all(s["dynamic/gen_batches"] >= 2 and s["dynamic/kept_group_frac"] < 1 for s in steps)


def test_dynamic_sampling_stops_at_its_limit_and_trains_nothing(tmp_path, monkeypatch):
    constant = [{"name": "exact_match", "kwargs": {"extract": "full", "field": "never"}, "failure_value": 0.0}]
    batches, steps = _run(tmp_path, monkeypatch, constant,
                          rollout={"dynamic_sampling": True, "max_gen_batches": 3}, train={"steps": 2},
                          algorithm={"beta": 0.0})
    for batch, drawn, info in batches:
        assert info["gen_batches"] == 3 and len(drawn) == 12 and info["kept_groups"] == 0
        assert len(batch) == 16 and not batch.mask.any()  # filler groups: no loss, no normalisation count
    assert all(s["dynamic/gen_batches"] == 3 and s["dynamic/kept_group_frac"] == 0 and s["loss"] == 0 for s in steps)
