"""CORY (llm_rl/cory.py; shared/attempts.py with rollout.agents 2): roles, collective reward, per-agent routing
of log-probs and gradients, the observer's prompt, and a crash/resume-exact loop run on a tiny Qwen2."""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from llm_rl.cory import CoryPolicy, role_at_step
from shared.attempts import ATTEMPT2_GROUP, collective_reward, revision_row, two_attempts
from shared.config import ConfigError, validate_config
from shared.recipe import build_components
from shared.rollout import Rollout
from tests.helpers.tiny import crash_on_sample, tiny_config_dict

TEMPLATE = "{prompt}{completion} {prompt}"
CORY = {"rollout": {"attempts": 2, "agents": 2, "revision_template": TEMPLATE},
        "algorithm": {"beta": 0.01, "cory_role_exchange_steps": 2}, "train": {"grad_accum_steps": 4}}
TIMING_KEYS = ("step_seconds", "tokens_per_s/sample", "tokens_per_s/train")


def _cory_config(tmp_path, **over):
    d = tiny_config_dict(tmp_path, **CORY)
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return d


def _policy(tmp_path) -> tuple[CoryPolicy, object, object, object]:
    """A CORY policy whose two agents have different weights (agent 1 perturbed), its task, reward and config."""
    cfg = validate_config(_cory_config(tmp_path), "t")
    comps = build_components(cfg, Accelerator(cpu=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in comps.policy.agents[1].module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return comps.policy, comps.task, comps.reward, cfg


def test_role_at_step_by_hand():
    # T_REx = 2: steps 1-2 copy 0, 3-4 copy 1, 5-6 copy 0; step 0 (before RL) is step 1's role
    assert [role_at_step(s, 2) for s in range(7)] == [0, 0, 0, 1, 1, 0, 0]
    assert [role_at_step(s, 1) for s in range(1, 5)] == [0, 1, 0, 1]
    assert [role_at_step(s, 3) for s in range(1, 8)] == [0, 0, 0, 1, 1, 1, 0]


def test_collective_reward_by_hand():
    r1, r2 = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert collective_reward(r1, r2).tolist() == [2.0, 1.0, 1.0, 0.0]


def test_log_probs_route_each_sample_to_its_agent(tmp_path):
    cory, task, _, _ = _policy(tmp_path)
    rows = task.split("train")[:3]
    batch = Rollout.cat([cory.sample_by(0, rows, 2, seed=1, first_sample_id=0, first_group_id=0),
                         cory.sample_by(1, rows, 2, seed=1, first_sample_id=100, first_group_id=10)])
    batch.extras["agent"] = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0])  # mixed order
    with torch.no_grad():
        logp, entropy = cory.log_probs(batch, with_entropy=True)
    d_single = tiny_config_dict(tmp_path)  # a plain one-agent policy, loaded with each agent's weights in turn
    single = build_components(validate_config(d_single, "t"), Accelerator(cpu=True)).policy
    for k in (0, 1):
        single.module.model.load_state_dict(cory.agents[k].module.model.state_dict())
        idx = (batch.extras["agent"] == k).nonzero().squeeze(-1)
        with torch.no_grad():
            want, want_ent = single.log_probs(batch.select(idx), with_entropy=True)
        torch.testing.assert_close(logp[idx], want)
        torch.testing.assert_close(entropy[idx], want_ent)
    with torch.no_grad():  # the agents differ, so the routing matters
        other = single.log_probs(batch.select((batch.extras["agent"] == 0).nonzero().squeeze(-1)))[0]
    assert not torch.allclose(other, logp[batch.extras["agent"] == 0])


def test_gradients_reach_only_the_agent_that_produced_each_sample(tmp_path):
    cory, task, _, _ = _policy(tmp_path)
    batch = cory.sample_by(0, task.split("train")[:2], 3, seed=1, first_sample_id=0, first_group_id=0)
    batch.extras["agent"] = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    params = [list(cory.agents[k].module.parameters()) for k in (0, 1)]

    def grad_norms(loss_rows) -> list[float]:
        for p in params[0] + params[1]:
            p.grad = None
        logp = cory.log_probs(batch)[0]
        (logp * batch.mask)[loss_rows].sum().backward()
        return [sum(float(p.grad.abs().sum()) for p in ps if p.grad is not None) for ps in params]

    agent = batch.extras["agent"]
    g0, g1 = grad_norms(agent == 0)
    assert g0 > 0 and g1 == 0.0
    g0, g1 = grad_norms(agent == 1)
    assert g0 == 0.0 and g1 > 0
    only0 = batch.select((agent == 0).nonzero().squeeze(-1))  # agent 1 absent: zero gradients, not missing ones
    only0_logp = cory.log_probs(only0)[0]
    for p in params[0] + params[1]:
        p.grad = None
    (only0_logp * only0.mask).sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0.0 for p in params[1])


def test_observer_answers_after_seeing_the_pioneer(tmp_path):
    cory, task, reward, cfg = _policy(tmp_path)
    rows = task.split("train")[:2]
    G = cfg.rollout.samples_per_prompt
    for step, pioneer in ((1, 0), (3, 1)):  # T_REx = 2: roles swap at step 3
        cory.begin_step(step)
        assert cory.pioneer == pioneer and cory.observer.index == 1 - pioneer
        first = cory.sample(rows, G, seed=0, first_sample_id=0, first_group_id=5)
        res1 = reward(first.completions, first.fields(), step=step)
        first.rewards, first.components = res1.total, res1.components
        r1 = first.rewards.clone()
        both, res2 = two_attempts(cory, first, reward, cfg, step, 0)
        n = len(first)
        assert both.extras["agent"].tolist() == [float(pioneer)] * n + [float(1 - pioneer)] * n
        assert both.group_ids[n:].tolist() == (both.group_ids[:n] + ATTEMPT2_GROUP).tolist()
        for row, prev, r in zip(both.rows[n:], both.completions[:n], both.rows[:n]):
            assert row["prompt"] == f"{r['prompt']}{prev} {r['prompt']}"
        # the second attempts are the observer copy's own samples of those prompts
        rows2 = [revision_row(r, c, TEMPLATE) for r, c in zip(both.rows[:n], both.completions[:n])]
        direct = cory.agents[1 - pioneer].sample(rows2, 1, seed=cfg.seed, first_sample_id=ATTEMPT2_GROUP,
                                                 first_group_id=0)
        assert both.completions[n:] == direct.completions
        want = collective_reward(r1.double(), res2.total.double())
        torch.testing.assert_close(both.rewards[:n].double(), want)
        torch.testing.assert_close(both.rewards[n:].double(), want)
        assert both.extras["pg_weight"].tolist() == [1.0] * (2 * n)
        assert both.extras["kl_coef"].tolist() == pytest.approx([0.01] * (2 * n))


def _weights(run_dir, step) -> dict:
    model = run_dir / "checkpoints" / f"step_{step:06d}" / "model"
    return {f"agent_{k}/{name}": v for k in (0, 1)
            for name, v in load_file(model / f"agent_{k}" / "model.safetensors").items()}


def _metrics(run_dir) -> list[dict]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_cory_loop_reports_both_agents_swaps_roles_and_resumes_exactly(tmp_path, monkeypatch):
    from shared.loop import train

    full = train(validate_config(_cory_config(tmp_path, name="full"), "t"))
    run = tmp_path / "runs" / "full"
    m = full["after_metrics"]
    assert {"accuracy", "accuracy@observer", "accuracy@t2", "pioneer_agent"} <= set(m)
    assert full["before_metrics"]["pioneer_agent"] == 0.0 and m["pioneer_agent"] == 1.0  # steps 3-4: copy 1 leads
    # both copies start equal, so before RL the observer alone scores what the pioneer scores
    assert full["before_metrics"]["accuracy@observer"] == full["before_metrics"]["accuracy"]
    for step, pioneer in ((2, 0), (4, 1)):
        roles = json.loads((run / "checkpoints" / f"step_{step:06d}" / "model" / "roles.json").read_text())
        assert roles["pioneer"] == pioneer
    final = _weights(run, 4)
    a0 = {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("agent_0/")}
    a1 = {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("agent_1/")}
    assert sum(not torch.equal(a0[k], a1[k]) for k in a0) > len(a0) // 2  # each trained on its own samples
    steps = [r for r in _metrics(run) if "loss" in r]
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) and math.isfinite(r["kl_ref"]) for r in steps)

    crash = _cory_config(tmp_path, name="crash")
    crash_on_sample(monkeypatch, at=3)  # the pioneer's 3rd sampling call: step 3
    with pytest.raises(KeyboardInterrupt):
        train(validate_config(crash, "t"))
    monkeypatch.undo()
    crash_dir = tmp_path / "runs" / "crash"
    assert [p.name for p in (crash_dir / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step_000002"]
    resumed = train(validate_config(_cory_config(tmp_path, name="crash", checkpoint={"resume": True}), "t"))
    b = _weights(crash_dir, 4)
    for k in final:
        torch.testing.assert_close(final[k], b[k], rtol=0, atol=0, msg=k)
    assert _metrics(run) == _metrics(crash_dir)
    assert resumed["after_metrics"] == m


def test_cory_config_errors(tmp_path):
    def check(match, **over):
        with pytest.raises(ConfigError, match=match):
            validate_config(_cory_config(tmp_path, **over), "t")

    check("rollout.attempts: 2", rollout={"attempts": 1})
    check("domain 'llm'", domain="vision")
    check("online sampling", rollout={"dynamic_sampling": True})
    check("online sampling", rollout={"replay_buffer": 4})
    check("online sampling", hybrid={"name": "relift"})
    check("online sampling", rollout={"source": "offline"})
    check("model.lora", model={"name_or_path": "embedded", "lora": {"r": 4}})
    check("score_stage1_steps", algorithm={"score_stage1_steps": 3})
    cfg = validate_config(_cory_config(tmp_path), "t")
    assert cfg.rollout.agents == 2 and cfg.algorithm.cory_role_exchange_steps == 2


@pytest.mark.slow
def test_two_process_cory_equals_one_process(tmp_path):
    """2 processes (gloo, DDP over the agent pair) take the same optimizer steps as 1 process, although each
    micro-batch holds one agent's samples only (the other agent's gradient is an explicit zero)."""
    from shared.loop import train
    from tests.test_loop import EQUAL_STEP_OPTIM, _launch_two, assert_same_run

    common = {"checkpoint": {"every": 0}, **EQUAL_STEP_OPTIM}
    train(validate_config(_cory_config(tmp_path, name="one", train={"steps": 2, "micro_batch_size": 8}, **common), "t"))
    _launch_two(tmp_path, _cory_config(tmp_path, name="two", train={"steps": 2, "micro_batch_size": 4}, **common))
    assert_same_run(tmp_path, ("loss", "reward/total"), weights=_weights)
