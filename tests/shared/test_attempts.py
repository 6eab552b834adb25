"""Two-attempt rollouts and SCoRe's stages (shared/attempts.py, the per-sample weights of ppo_clip)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate import Accelerator

from shared.aggregation import StepNorm
from shared.attempts import ATTEMPT2_GROUP, correction_bonus, revision_row, score_weights, two_attempts
from shared.config import AlgorithmConfig, ConfigError, validate_config
from shared.kl import kl_penalty
from shared.objectives import ppo_clip
from shared.recipe import build_components
from tests.helpers.tiny import tiny_config_dict


def test_score_weights_and_bonus_by_hand():
    attempt = torch.tensor([1.0, 1.0, 2.0, 2.0])
    pg, kl = score_weights(1, attempt, beta=0.01, first_attempt_beta=0.1)
    assert pg.tolist() == [0.0, 0.0, 1.0, 1.0] and kl.tolist() == pytest.approx([0.1, 0.1, 0.0, 0.0])
    pg, kl = score_weights(2, attempt, beta=0.01, first_attempt_beta=0.1)
    assert pg.tolist() == [1.0] * 4 and kl.tolist() == pytest.approx([0.01] * 4)
    r1, r2 = torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert correction_bonus(r1, r2, 10.0).tolist() == [11.0, -10.0, 1.0, 0.0]


def test_revision_row():
    row = {"prompt": "12+3=", "answer": "15", "completion_length": 3}
    out = revision_row(row, "14", "{prompt}{completion} {prompt}")
    assert out == {"prompt": "12+3=14 12+3=", "answer": "15"}


def test_ppo_clip_per_sample_weights_and_kl_coefficients():
    torch.manual_seed(0)
    logp, old, ref = torch.randn(4, 3) * 0.1 - 1, torch.randn(4, 3) * 0.1 - 1, torch.randn(4, 3) * 0.1 - 1
    adv, mask = torch.tensor([1.0, -1.0, 0.5, 2.0]), torch.ones(4, 3)
    cfg = AlgorithmConfig(beta=0.5, kl_estimator="k3")
    pg, coef = torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([0.1, 0.0, 0.3, 0.0])
    loss, _ = ppo_clip(logp, old, ref, adv, mask, cfg, StepNorm(12, 4, 3), pg_weight=pg, kl_coef=coef)
    ratio = (logp - old).exp()
    a = (adv * pg).unsqueeze(-1)
    surr = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
    want = (surr + coef.unsqueeze(-1) * kl_penalty(logp, ref, "k3", 10.0)).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-6)


def test_two_attempts_on_a_tiny_policy(tmp_path):
    d = tiny_config_dict(tmp_path, rollout={"attempts": 2, "revision_template": "{prompt}{completion} {prompt}"},
                         algorithm={"score_stage1_steps": 1, "correction_bonus": 10.0, "beta": 0.01,
                                    "first_attempt_beta": 0.1})
    cfg = validate_config(d, "t")
    comps = build_components(cfg, Accelerator(cpu=True))
    rows = comps.task.split("train")[:2]
    G = cfg.rollout.samples_per_prompt

    def first_attempts():
        part = comps.policy.sample(rows, G, seed=0, first_sample_id=0, first_group_id=5)
        res = comps.reward(part.completions, part.fields(), step=1)
        part.rewards, part.components = res.total, res.components
        return part

    first = first_attempts()
    both, res2 = two_attempts(comps.policy, first_attempts(), comps.reward, cfg, 1, 0)
    n = len(first)
    assert len(both) == 2 * n
    assert both.group_ids[:n].tolist() == first.group_ids.tolist()
    assert both.group_ids[n:].tolist() == (first.group_ids + ATTEMPT2_GROUP).tolist()
    for row, prev, r in zip(both.rows[n:], first.completions, first.rows):
        assert row["prompt"] == f"{r['prompt']}{prev} {r['prompt']}"
    assert both.extras["attempt"].tolist() == [1.0] * n + [2.0] * n
    assert both.extras["pg_weight"].tolist() == [0.0] * n + [1.0] * n  # stage I at step 1
    torch.testing.assert_close(both.rewards[n:], res2.total.to(both.rewards.dtype))
    stage2, res2b = two_attempts(comps.policy, first_attempts(), comps.reward, cfg, 2, 0)
    torch.testing.assert_close(stage2.rewards[n:].double(),
                               correction_bonus(first.rewards.double(), res2b.total.double(), 10.0))


def test_score_in_the_loop_reports_both_attempts(tmp_path):
    from shared.loop import train

    d = tiny_config_dict(tmp_path, rollout={"attempts": 2, "revision_template": "{prompt}{completion} {prompt}"},
                         algorithm={"score_stage1_steps": 2, "beta": 0.01}, train={"grad_accum_steps": 4})
    summary = train(validate_config(d, "t"))
    assert {"accuracy", "accuracy@t2", "delta_t1_t2", "i_to_c", "c_to_i"} <= set(summary["after_metrics"])
    m = summary["after_metrics"]
    assert m["delta_t1_t2"] == pytest.approx(m["accuracy@t2"] - m["accuracy"])
    assert m["i_to_c"] - m["c_to_i"] == pytest.approx(m["delta_t1_t2"])
    rows = [json.loads(l) for l in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) and math.isfinite(r["kl_ref"]) for r in steps)


def test_attempts_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="revision_template"):
        validate_config(tiny_config_dict(tmp_path, rollout={"attempts": 2, "revision_template": "{prompt}"}), "t")
    with pytest.raises(ConfigError, match="rollout.attempts"):
        validate_config(tiny_config_dict(tmp_path, rollout={"attempts": 2}, algorithm={"advantage": "remax"}), "t")
    with pytest.raises(ConfigError, match="samples_per_prompt \\* attempts"):
        from shared.config import optimizer_steps_per_rollout

        cfg = validate_config(tiny_config_dict(tmp_path, rollout={"attempts": 2}, train={"micro_batch_size": 3}), "t")
        optimizer_steps_per_rollout(cfg, 1)
