"""Response prefills (CausalLMPolicy), Mixed-CoT-RL flawed prefixes (shared/prefill.py) and MRT (shared/mrt.py)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from accelerate import Accelerator

from llm_rl.tasks.arithmetic import flawed_steps, scratchpad
from shared.advantages import compute_advantages
from shared.config import validate_config
from shared.mrt import cut_prefix, episode_ends, first_episode, mrt_extras, suppressed_ids, termination_values
from shared.prefill import with_flawed_prefixes
from shared.recipe import build_components
from tests.helpers.tiny import tiny_config_dict

SCRATCH = {"task": {"format": "scratchpad", "digits": 2},
           "rewards": [{"name": "exact_match", "kwargs": {"extract": "last_number"}}],
           "rollout": {"max_new_tokens": 8}, "algorithm": {"step_delimiter": " "}}


# ------------------------------------------------------------------ pure pieces, by hand
def test_episodes_of_a_scratchpad_trace():
    t = "4+8=12 3+7+1=11 1+0+1=2 212"
    assert episode_ends(t, " ") == [7, 16, 24]  # after each step; the answer is the last episode
    assert episode_ends("212", " ") == [] and episode_ends("4+8=12 ", " ") == []  # nothing after the delimiter
    assert first_episode("3+7+1=11 1+0+1=2 212", " ") == "3+7+1=11 "
    assert first_episode("212", " ") is None
    cuts = {cut_prefix(t, " ", random.Random(k)) for k in range(200)}
    assert cuts == {"", "4+8=12 ", "4+8=12 3+7+1=11 ", "4+8=12 3+7+1=11 1+0+1=2 "}


def test_mrt_advantage_by_hand():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    b = torch.tensor([0.25, 0.25, 0.75, 0.75])
    bonus = torch.tensor([0.5, -0.25, 0.0, 0.0])
    adv = compute_advantages("mrt", r, torch.tensor([0, 0, 1, 1]), baseline=b, progress_bonus=bonus)
    assert adv.tolist() == pytest.approx([1.25, -0.5, 0.25, -0.75])
    with pytest.raises(ValueError, match="progress_bonus"):
        compute_advantages("mrt", r, torch.tensor([0, 0, 1, 1]), baseline=b)


@pytest.mark.parametrize("a,b", [(34, 5678), (99, 1), (0, 0), (505, 495), (7, 80)])
def test_flawed_steps_hold_exactly_one_error_of_their_kind(a, b):
    ref = scratchpad(a, b).split(" ")
    for seed in range(30):
        for kind in ("calculation", "reasoning"):
            pre = flawed_steps(a, b, kind, random.Random(seed))
            assert pre.endswith(" ")
            steps = pre[:-1].split(" ")
            assert steps[:-1] == ref[: len(steps) - 1]  # the steps before the flawed one are right
            bad, good = steps[-1], ref[len(steps) - 1]
            assert bad != good and len(steps) < len(ref)  # the flawed step replaces a step, never the answer
            (bl, bt), (gl, gt) = bad.split("="), good.split("=")
            if kind == "calculation":  # same terms, total off by one
                assert bl == gl and abs(int(bt) - int(gt)) == 1
            else:  # carry misapplied: the terms' sum is right for the (wrong) terms written
                assert bl != gl and int(bt) == sum(int(x) for x in bl.split("+"))
                assert bl.split("+")[:2] == gl.split("+")[:2]


def test_flawed_mixture_is_deterministic_and_has_the_asked_share(tmp_path):
    task = build_components(validate_config(tiny_config_dict(tmp_path, **SCRATCH), "t"), Accelerator(cpu=True)).task
    rows = task.split("train")
    mixed = with_flawed_prefixes(task, rows, 0.5, ["calculation"], seed=0)
    assert mixed == with_flawed_prefixes(task, rows, 0.5, ["calculation"], seed=0)
    assert mixed != with_flawed_prefixes(task, rows, 0.5, ["calculation"], seed=1)
    flawed = [m for m in mixed if "prefill" in m]
    assert 0.25 * len(rows) < len(flawed) < 0.75 * len(rows)
    assert all("prefill" not in r for r in rows)  # the task's rows are not modified
    assert not any("prefill" in m for m in with_flawed_prefixes(task, rows, 0.0, ["reasoning"], 0))
    held = task.split("eval_flawed")
    assert [h["prompt"] for h in held] == [e["prompt"] for e in task.split("eval")]
    assert all(h["prefill"].endswith(" ") for h in held)
    with pytest.raises(ValueError, match="no split 'nope'"):
        task.split("nope")


# ------------------------------------------------------------------ the policy continues a prefill
@pytest.fixture()
def scratch(tmp_path):
    cfg = validate_config(tiny_config_dict(tmp_path, **SCRATCH), "t")
    comps = build_components(cfg, Accelerator(cpu=True))
    return cfg, comps


def test_prefill_is_a_prompt_input_and_starts_the_text(scratch):
    cfg, comps = scratch
    policy = comps.policy
    row = dict(comps.task.split("train")[0])
    filled = dict(row, prefill="1+2=3 ")
    inputs, mask, texts, _ = policy.generate([filled], 3, seed=5, first_sample_id=0)
    same, mask2, texts2, _ = policy.generate([dict(row, prompt=row["prompt"] + "1+2=3 ")], 3, seed=5, first_sample_id=0)
    assert torch.equal(inputs["input_ids"], same["input_ids"]) and torch.equal(mask, mask2)  # prompt + prefill
    assert texts == ["1+2=3 " + t for t in texts2]  # the response text starts with the prefill
    batch = policy.sample([filled], 2, seed=5, first_sample_id=0, first_group_id=0)
    n_prefill = len(policy.tokenizer("1+2=3 ", add_special_tokens=False)["input_ids"])
    assert batch.mask.sum(-1).tolist() == [len(policy.tokenizer(t[6:], add_special_tokens=False)["input_ids"]) + 1
                                           if len(t[6:]) < cfg.rollout.max_new_tokens else cfg.rollout.max_new_tokens
                                           for t in batch.completions]  # only the continuation (+ EOS) is trained
    assert n_prefill == 6


def test_forced_answers_never_use_suppressed_tokens(scratch):
    cfg, comps = scratch
    policy, tok = comps.policy, comps.policy.tokenizer
    banned = suppressed_ids(tok, ["+", "=", " "])
    assert sorted(tok.decode([i]) for i in banned) == [" ", "+", "="]
    rows = comps.task.split("train")[:3]
    vals = termination_values(policy, rows, ["", "1+1=2 ", "0+0=0 "], comps.reward, cfg.model_copy(
        update={"algorithm": cfg.algorithm.model_copy(update={"mrt_answer_suppress": ["+", "=", " "],
                                                                "mrt_answers": 5})}), 1, 0)
    assert vals.shape == (3,) and all(0.0 <= v <= 1.0 for v in vals.tolist())
    _, _, texts, _ = policy.generate([dict(r, prefill="1+1=2 ") for r in rows], 5, seed=0, first_sample_id=0,
                                     max_new_tokens=6, suppress=banned)
    assert all(not set(t[6:]) & set("+= ") for t in texts)
    assert policy.suppress_ids == []  # the ban lasted only for that call


def test_mrt_extras_match_a_direct_computation(scratch):
    cfg, comps = scratch
    cfg = cfg.model_copy(update={"algorithm": cfg.algorithm.model_copy(update={
        "advantage": "mrt", "mrt_answers": 3, "mrt_answer_suppress": ["+", "=", " "], "mrt_progress_coef": 0.5})})
    policy = comps.policy
    rows = [dict(r, prefill=p) for r, p in zip(comps.task.split("train")[:2], ["", "1+1=2 "])]
    G = cfg.rollout.samples_per_prompt
    part = policy.sample(rows, G, seed=1, first_sample_id=8, first_group_id=2)
    ex = mrt_extras(policy, part, comps.reward, cfg, 1, 8)
    j = termination_values(policy, rows, ["", "1+1=2 "], comps.reward, cfg, 1, (1 << 46) + 8 // G * 3)
    assert torch.allclose(ex["baseline"], j.float().repeat_interleave(G))
    for i in range(len(part)):
        z = first_episode(part.completions[i][len(part.rows[i]["prefill"]):], " ")
        if z is None:
            assert float(ex["progress_bonus"][i]) == 0.0
    assert ex["progress_bonus"].abs().max() <= 0.5


# ------------------------------------------------------------------ the loop
def test_mrt_runs_in_the_loop_and_logs_its_values(tmp_path):
    from shared.loop import train

    cfg = validate_config(tiny_config_dict(tmp_path, **{**SCRATCH, "algorithm": {
        "advantage": "mrt", "step_delimiter": " ", "mrt_answers": 2, "mrt_answer_tokens": 4,
        "mrt_answer_suppress": ["+", "=", " "]}}, train={"steps": 2}), "t")
    summary = train(cfg)
    assert math.isfinite(summary["after"])
    lines = [json.loads(x) for x in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "extras/baseline" in x]
    assert len(logged) == 2 and all(0.0 <= x["extras/baseline"] <= 1.0 for x in logged)


def test_mixed_cot_runs_and_reports_the_flawed_split(tmp_path):
    from shared.loop import train

    cfg = validate_config(tiny_config_dict(tmp_path, **{**SCRATCH, "rollout": {"max_new_tokens": 8, "prefill": "flawed"},
                                                        "eval": {"extra_splits": ["eval_flawed"]}},
                                           train={"steps": 2}), "t")
    summary = train(cfg)
    for m in (summary["before_metrics"], summary["after_metrics"]):
        assert {"accuracy", "eval_flawed/accuracy", "eval_flawed/n"} <= set(m)


@pytest.mark.parametrize("over,match", [
    ({"domain": "diffusion", "rollout": {"prefill": "flawed"}}, "domain llm"),
    ({"algorithm": {"advantage": "mrt", "step_delimiter": ""}}, "step_delimiter"),
    ({"algorithm": {"advantage": "mrt"}, "rollout": {"prefill": "flawed"}}, "advantage mrt"),
])
def test_prefill_config_errors(tmp_path, over, match):
    with pytest.raises(ValueError, match=match):
        validate_config(tiny_config_dict(tmp_path, **over), "t")


def test_missing_extra_split_fails_before_training(tmp_path):
    from shared.loop import train

    with pytest.raises(ValueError, match="no split 'eval_flawed'"):  # the answer-only format has no flawed split
        train(validate_config(tiny_config_dict(tmp_path, eval={"extra_splits": ["eval_flawed"]}), "t"))
