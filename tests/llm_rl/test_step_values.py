"""Per-step Monte Carlo values (shared/step_values.py) on a tiny Qwen2: continuations, values, advantages."""

from __future__ import annotations

import math

import torch

from shared.config import validate_config
from tests.helpers.tiny import tiny_config_dict


def _setup(tmp_path, **algo):
    from accelerate import Accelerator

    from shared.recipe import build_components

    cfg = validate_config(tiny_config_dict(tmp_path, algorithm={"advantage": "per_step", "step_delimiter": "",
                                                                "step_rollouts": 3, **algo}), "test")
    comps = build_components(cfg, Accelerator(cpu=True))
    return cfg, comps


def test_continuations_keep_the_prefix_and_respect_the_budget(tmp_path):
    cfg, comps = _setup(tmp_path)
    policy = comps.policy
    rows = comps.task.split("train")[:2]
    batch = policy.sample(rows, 2, seed=1, first_sample_id=0, first_group_id=0)
    T = batch.mask.shape[1]
    for cut in (1, 2):
        texts, lengths = policy.continue_completions(batch, [0, 3], cut, 4, seed=5, first_sample_id=1000)
        assert len(texts) == 8 and all(cut < n <= cfg.rollout.max_new_tokens for n in lengths)
        prefixes = [policy.tokenizer.decode(batch.inputs["input_ids"][i, -T:][:cut]) for i in (0, 3)]
        for k, t in enumerate(texts):
            assert t.startswith(prefixes[k // 4]) and len(t) <= cfg.rollout.max_new_tokens


def test_step_values_and_advantages_on_sampled_answers(tmp_path):
    from shared.advantages import per_step
    from shared.step_values import step_values

    cfg, comps = _setup(tmp_path)
    policy = comps.policy
    rows = comps.task.split("train")[:3]
    batch = policy.sample(rows, 4, seed=1, first_sample_id=0, first_group_id=0)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0] * 3)  # labels given by hand: who is "correct"
    calls = []
    real = policy.continue_completions
    policy.continue_completions = lambda b, idx, cut, n, **k: calls.append((list(idx), cut)) or real(b, idx, cut, n, **k)
    scores = comps.reward(batch.completions, batch.fields()).total
    vals = step_values(policy, batch, rewards, comps.reward, cfg, step=1)
    lengths = batch.mask.sum(-1).tolist()
    for i, n in enumerate(lengths):
        n = int(n)
        assert vals[i, n - 1] == rewards[i]  # the answer's own reward at its last token
        assert torch.isnan(vals[i, n:]).all()
        inner = vals[i, : n - 1]
        if rewards[i] > 0.5:
            assert torch.isnan(inner).all()  # correct answers are not continued
        else:  # every token is a step: a value in the reward's range after each
            assert not torch.isnan(inner).any()
            assert bool(((inner >= float(scores.min()) - 1) & (inner <= 1.0)).all())
    # one continuation call per distinct cut, only for incorrect answers
    negatives = {i for i in range(12) if rewards[i] <= 0.5}
    assert {i for idx, _ in calls for i in idx} <= negatives
    assert len({cut for _, cut in calls}) == len(calls)
    adv = per_step(rewards, batch.group_ids, step_values=vals)
    assert adv.shape == batch.mask.shape
    for i, n in enumerate(lengths):
        n = int(n)
        outcome = float(rewards[i] - rewards[batch.group_ids == batch.group_ids[i]].mean())
        if rewards[i] > 0.5:  # correct: the outcome advantage r - group mean on every token
            torch.testing.assert_close(adv[i, :n], torch.full((n,), outcome))
        else:  # incorrect, one step per token: the step advantages add up to the outcome advantage
            assert math.isclose(float(adv[i].sum()), outcome, abs_tol=1e-6)
        assert float(adv[i, n:].abs().sum()) == 0.0


def test_per_step_training_steps_run(tmp_path):
    from shared.loop import train

    summary = train(validate_config(tiny_config_dict(
        tmp_path, algorithm={"advantage": "per_step", "step_delimiter": "", "step_rollouts": 2,
                             "positive_threshold": -0.25}, train={"steps": 2}), "test"))
    assert math.isfinite(summary["after"])
