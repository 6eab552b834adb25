"""Offline data through the RL loop (`rollout.source: offline`), per-prompt baselines (ReMax, A-LoL),
and the special forward passes of ASFT (full-vocabulary KL) and IFT (temporal-residual inputs).

Everything runs on the embedded tiny Qwen2 (2-digit arithmetic, hidden 32, 1 layer, 2 heads) on CPU.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate import Accelerator

from llm_rl.policy import CausalLMPolicy
from llm_rl.rewards import overlong_penalty
from llm_rl.tasks.arithmetic import (
    ArithmeticTask,
    ArithmeticTaskConfig,
    build_model,
    build_tokenizer,
)
from llm_rl.tasks.jsonl import JsonlTask
from shared.advantages import clip_advantages, compute_advantages
from shared.baselines import build_baseline
from shared.config import ConfigError, validate_config
from shared.loop import collect_rollout
from shared.offline import offline_rollout
from shared.recipe import build_components, combined_reward
from shared.rewards import REWARDS
from shared.rollout import first_in_group
from shared.sampler import build_sampler
from tests.helpers.tiny import tiny_config_dict

TINY = {"digits": 2, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "sft_size": 10, "train_size": 24,
        "val_size": 8, "eval_size": 8}
# prompts of different lengths, so prompts are left-padded
ROWS = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "12+34=", "answer": "46"}]
NO_LOGGING = {"progress": False, "tensorboard": False, "plots": False}


def _const10():
    """A reward far above the value head's clamp (1.0)."""
    def reward(completions, **_):
        return [10.0] * len(completions)
    return reward


REWARDS.setdefault("test_offline_const10", _const10)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def acc():
    return Accelerator(cpu=True)


def _policy(tok, seed=0, temperature=1.0, max_new_tokens=5) -> CausalLMPolicy:
    torch.manual_seed(seed)
    model = build_model(ArithmeticTaskConfig(**TINY), tok)
    return CausalLMPolicy(model, tok, temperature=temperature, max_new_tokens=max_new_tokens)


def _cfg(tmp_path, **over):
    over.setdefault("logging", NO_LOGGING)
    return validate_config(tiny_config_dict(tmp_path, **over), "test")


def _plain_logits(model, inputs, T):
    """Logits [B, T, V] predicting the last T tokens, from one ordinary full forward of the HF model."""
    am = inputs["attention_mask"]
    position_ids = (am.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=inputs["input_ids"], attention_mask=am, position_ids=position_ids).logits
    return logits[:, -T - 1 : -1].float()


def _perturb(module, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------ 1. rollout_from (teacher forcing)


def test_rollout_from_layout(tok):
    policy = _policy(tok)
    ro = policy.rollout_from(ROWS, [["12", "7"], ["30", "31"]], first_group_id=5)
    assert ro.group_ids.tolist() == [5, 5, 6, 6]
    assert ro.completions == ["12", "7", "30", "31"]
    assert ro.mask.sum(-1).tolist() == [3, 2, 3, 3]  # characters + EOS
    assert [r["prompt"] for r in ro.rows] == ["1+2=", "1+2=", "12+34=", "12+34="]
    T = ro.mask.shape[1]
    enc = policy.encode_rows(ROWS, "cpu")
    ids, am = ro.inputs["input_ids"], ro.inputs["attention_mask"]
    assert torch.equal(ids[:, :-T], enc["input_ids"].repeat_interleave(2, 0))
    assert torch.equal(am[:, :-T], enc["attention_mask"].repeat_interleave(2, 0))
    assert torch.equal(am[:, -T:], ro.mask)
    eos = tok.eos_token_id
    for i, text in enumerate(ro.completions):
        want = tok(text, add_special_tokens=False)["input_ids"] + [eos]
        assert ids[i, -T:][ro.mask[i].bool()].tolist() == want
        assert (ids[i, -T:][~ro.mask[i].bool()] == policy.pad_id).all()


def test_rollout_from_log_probs_equal_sampled_log_probs(tok):
    policy = _policy(tok, temperature=0.8)
    n = 6
    sampled = policy.sample(ROWS, n, seed=3, first_sample_id=0, first_group_id=0)
    groups = [sampled.completions[i * n : (i + 1) * n] for i in range(len(ROWS))]
    rebuilt = policy.rollout_from(ROWS, groups, first_group_id=0)
    assert rebuilt.completions == sampled.completions
    assert torch.equal(rebuilt.group_ids, sampled.group_ids)
    with torch.no_grad():
        lp_s = policy.log_probs(sampled)[0]
        lp_r = policy.log_probs(rebuilt)[0]
    Ts, Tr = sampled.mask.shape[1], rebuilt.mask.shape[1]
    special = set(tok.all_special_ids) - {tok.eos_token_id}
    compared = 0
    for i in range(len(sampled)):
        m = int(sampled.mask[i].sum())
        toks_s = sampled.inputs["input_ids"][i, -Ts:][:m].tolist()
        if special & set(toks_s):  # a <pad>/<bos> emitted mid-text does not survive decoding: not the same text
            continue
        toks_r = rebuilt.inputs["input_ids"][i, -Tr:][:m].tolist()
        assert toks_r == toks_s, i
        torch.testing.assert_close(lp_r[i, :m], lp_s[i, :m], atol=1e-5, rtol=0)
        assert lp_s[i, :m].ne(0).all()
        compared += 1
    assert compared >= len(sampled) // 2


# ------------------------------------------------------------------ 2. offline_rollout on arithmetic pairs


@pytest.fixture(scope="module")
def pairs_task():
    return ArithmeticTask(ArithmeticTaskConfig(**TINY, offline="pairs"))


def test_offline_rollout_pairs(tok, pairs_task):
    policy = _policy(tok)
    rows = pairs_task.split("train")[:3]
    ro, rewards = offline_rollout(policy, rows, 10)
    assert rewards.tolist() == [1.0, 0.0] * 3
    assert ro.group_ids.tolist() == [10, 10, 11, 11, 12, 12]
    assert ro.completions == [c for r in rows for c in (r["answer"], r["rejected"])]
    assert all(r["chosen"] == r["answer"] != r["rejected"] for r in rows)
    want = torch.tensor([-len(c) / 10 for c in ro.completions])
    torch.testing.assert_close(ro.extras["margin"], want)
    assert ro.mask.sum(-1).tolist() == [len(c) + 1 for c in ro.completions]


def test_offline_rollout_rewards_from_some_rows_only_raise(tok, pairs_task):
    policy = _policy(tok)
    row = pairs_task.split("train")[0]
    unscored = {"prompt": "5+6=", "answer": "11", "completions": ["11", "12"]}
    with pytest.raises(ConfigError, match=r"offline rows 10\.\.11: some rows give rewards and some do not"):
        offline_rollout(policy, [row, unscored], 10)
    # no rewards anywhere: the reward functions will score them
    ro, rewards = offline_rollout(policy, [unscored, dict(unscored, prompt="7+1=")], 0)
    assert rewards is None and "margin" not in ro.extras and len(ro) == 4


def test_offline_rollout_margins_from_some_rows_only_raise(tok, pairs_task):
    policy = _policy(tok)
    with_margins, plain = pairs_task.split("train")[:2]
    plain = {k: v for k, v in plain.items() if k != "margins"}
    with pytest.raises(ConfigError, match=r"offline rows 4\.\.5: 'margins' must be given by every row or by none"):
        offline_rollout(policy, [with_margins, plain], 4)


# ------------------------------------------------------------------ 3. offline DPO through the loop


def _dpo_dict(tmp_path, **over):
    base = {"task": {"offline": "pairs"}, "rollout": {"source": "offline", "samples_per_prompt": 2},
            "algorithm": {"objective": "dpo", "beta": 0.1, "advantage": "none"},
            "train": {"steps": 2, "micro_batch_size": 4, "grad_accum_steps": 2},
            "checkpoint": {"every": 0}, "logging": NO_LOGGING}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v}
    return tiny_config_dict(tmp_path, **base)


def test_offline_dpo_run(tmp_path, monkeypatch):
    from shared import loop

    seen = []
    real = loop.collect_rollout
    monkeypatch.setattr(loop, "collect_rollout", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    summary = loop.train(validate_config(_dpo_dict(tmp_path), "test"))
    assert math.isfinite(summary["after"])
    rows = [json.loads(l) for l in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        for k in ("loss", "pref_accuracy", "pref_margin", "reward/data", "reward/total"):
            assert r[k] is not None and math.isfinite(r[k]), (k, r)
        assert 0.0 <= r["pref_accuracy"] <= 1.0
        assert r["reward/data"] == pytest.approx(0.5) and r["reward/total"] == pytest.approx(0.5)
    # step 1: policy == reference, so every pair's margin is 0 and the DPO loss is log 2
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert steps[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    # the trained sequences are the data's (chosen, rejected) pairs, not samples
    batch = seen[0][0]
    assert len(batch) == 8 and batch.components.keys() == {"data"}
    for i in range(0, 8, 2):
        row = batch.rows[i]
        assert batch.completions[i : i + 2] == [row["chosen"], row["rejected"]]


def test_offline_config_checks(tmp_path):
    with pytest.raises(ConfigError, match="dynamic_sampling"):
        validate_config(_dpo_dict(tmp_path, rollout={"dynamic_sampling": True}), "test")
    remax = tiny_config_dict(tmp_path, task={"offline": "demos"}, logging=NO_LOGGING,
                             rollout={"source": "offline", "samples_per_prompt": 1},
                             algorithm={"advantage": "remax", "beta": 0.0},
                             train={"micro_batch_size": 4, "grad_accum_steps": 1})
    with pytest.raises(ConfigError, match="remax.*online"):
        validate_config(remax, "test")
    remax["rollout"]["source"] = "online"
    validate_config(remax, "test")  # the same config sampling online is fine


def test_offline_group_size_mismatch_tells_the_fix(tmp_path):
    from shared.loop import train

    cfg = validate_config(_dpo_dict(tmp_path, rollout={"samples_per_prompt": 3},
                                    train={"micro_batch_size": 6, "grad_accum_steps": 2}), "test")
    with pytest.raises(ConfigError, match=r"train row 0: 2 completions but rollout.samples_per_prompt is 3; "
                                          r"set rollout.samples_per_prompt to 2"):
        train(cfg)


# ------------------------------------------------------------------ 4. offline completions scored by rewards


def _jsonl_cfg(tmp_path, lines: list[dict]):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    d = tiny_config_dict(tmp_path, rewards=[{"name": "exact_match", "kwargs": {"extract": "full"}}],
                         rollout={"source": "offline", "samples_per_prompt": 1, "prompts_per_step": len(lines)},
                         algorithm={"advantage": "none", "beta": 0.0},
                         train={"micro_batch_size": 1, "grad_accum_steps": len(lines)}, logging=NO_LOGGING)
    d["task"] = {"name": "jsonl", "train_path": str(path), "eval_path": str(path), "use_chat_template": False}
    return validate_config(d, "test")


def _scored_offline(tok, acc, cfg):
    task = JsonlTask(cfg.task_config())
    rows = task.split("train")
    policy = _policy(tok)
    sampler = build_sampler(cfg.sampler, rows, cfg.rollout.prompts_per_step, cfg.seed)
    return collect_rollout(policy, sampler, rows, combined_reward(cfg), cfg, acc, step=1)


LINES = [{"prompt": "12+3=", "answer": "15"}, {"prompt": "20+22=", "answer": "42"}, {"prompt": "1+1=", "answer": "2"}]
GIVEN = ["15", "42", "3"]  # the last one is wrong
WANT = {"12+3=": 1.0, "20+22=": 1.0, "1+1=": 0.0}


def test_offline_demonstrations_without_reward_are_scored_by_reward_functions(tmp_path, tok, acc):
    cfg = _jsonl_cfg(tmp_path, LINES)
    rows = [dict(l, completion=c) for l, c in zip(LINES, GIVEN)]  # demonstration rows, no "reward"
    policy = _policy(tok)
    sampler = build_sampler(cfg.sampler, rows, cfg.rollout.prompts_per_step, cfg.seed)
    part, idx, info = collect_rollout(policy, sampler, rows, combined_reward(cfg), cfg, acc, step=1)
    assert sorted(idx) == [0, 1, 2]
    assert part.completions == [GIVEN[i] for i in idx]
    assert part.components.keys() == {"exact_match"}
    assert {r["prompt"]: float(x) for r, x in zip(part.rows, part.rewards)} == WANT
    assert sum(info["failures"].values()) == 0
    # with a reward in the data, the data's reward is used and the reward functions are not called
    rows = [dict(r, reward=0.25) for r in rows]
    sampler = build_sampler(cfg.sampler, rows, cfg.rollout.prompts_per_step, cfg.seed)
    part, _, _ = collect_rollout(policy, sampler, rows, combined_reward(cfg), cfg, acc, step=1)
    assert part.components.keys() == {"data"} and part.rewards.tolist() == [0.25] * 3


def test_jsonl_demonstrations_are_scored_by_reward_functions(tmp_path, tok, acc):
    cfg = _jsonl_cfg(tmp_path, [dict(l, completion=c) for l, c in zip(LINES, GIVEN)])
    from shared.offline import check_offline_rows

    check_offline_rows(JsonlTask(cfg.task_config()).split("train"), 1)
    part, _, info = _scored_offline(tok, acc, cfg)
    assert {r["prompt"]: float(x) for r, x in zip(part.rows, part.rewards)} == WANT
    assert sum(info["failures"].values()) == 0


def test_jsonl_unscored_groups_are_scored_by_reward_functions(tmp_path, tok, acc):
    cfg = _jsonl_cfg(tmp_path, [dict(l, completions=[c]) for l, c in zip(LINES, GIVEN)])
    part, idx, info = _scored_offline(tok, acc, cfg)
    assert sorted(idx) == [0, 1, 2] and part.completions == [GIVEN[i] for i in idx]
    assert sum(info["failures"].values()) == 0
    assert {r["prompt"]: float(x) for r, x in zip(part.rows, part.rewards)} == WANT


def test_offline_completions_get_token_lengths_for_rewards(tok):
    policy = _policy(tok)
    ro = policy.rollout_from(ROWS, [["12", "7"], ["30", "31"]], 0)
    assert [r.get("completion_length") for r in ro.rows] == ro.mask.sum(-1).tolist()


# ------------------------------------------------------------------ 5. ReMax greedy baseline


def _remax_setup(tmp_path, acc, unit="chars"):
    cfg = _cfg(tmp_path, task={"digits": 2},
               rewards=[{"name": "exact_match", "kwargs": {"extract": "full"}},
                        {"name": "overlong", "weight": 0.5, "kwargs": {"max_len": 3, "cache_len": 2, "unit": unit}}],
               algorithm={"advantage": "remax", "beta": 0.0})
    torch.manual_seed(0)
    comps = build_components(cfg, acc)
    baseline = build_baseline(cfg.algorithm.advantage, comps.policy, comps.task, comps.reward, cfg, acc)
    return cfg, comps, baseline


def _independent_reward(answers, completions):
    em = REWARDS["exact_match"](extract="full")(completions, answer=answers)
    return torch.tensor([float(e or 0.0) + 0.5 * overlong_penalty(len(c), 3, 2) for e, c in zip(em, completions)])


def test_remax_baseline_is_reward_of_greedy_output(tmp_path, acc):
    cfg, comps, baseline = _remax_setup(tmp_path, acc)
    assert baseline is not None
    policy = comps.policy
    rows = [dict(r) for r in comps.task.split("train")[:8]]
    greedy = policy.complete(rows)
    for i in range(0, 8, 2):  # make the greedy answer right on half the prompts
        rows[i]["answer"] = greedy[i]
    b = baseline(rows, 1)
    assert b.shape == (8,)
    torch.testing.assert_close(b, _independent_reward([r["answer"] for r in rows], greedy))
    assert len(set(b.tolist())) > 1

    # collect_rollout stores it per sample; the loop's advantages are r - b
    G = cfg.rollout.samples_per_prompt
    sampler = build_sampler(cfg.sampler, rows, cfg.rollout.prompts_per_step, cfg.seed)
    part, idx, _ = collect_rollout(policy, sampler, rows, comps.reward, cfg, acc, step=1, baseline=baseline)
    want_b = _independent_reward([rows[i]["answer"] for i in idx], [greedy[i] for i in idx]).repeat_interleave(G)
    torch.testing.assert_close(part.extras["baseline"], want_b)
    a = cfg.algorithm
    adv = compute_advantages(a.advantage, part.rewards.double(), part.group_ids, a.adv_eps,
                             threshold=a.positive_threshold, **part.extras)
    adv = clip_advantages(adv, a.adv_clip).float()
    torch.testing.assert_close(adv, part.rewards - want_b)


def test_remax_baseline_includes_token_length_rewards(tmp_path, acc):
    _, comps, baseline = _remax_setup(tmp_path, acc, unit="tokens")
    rows = comps.task.split("train")[:4]
    _, mask, texts, _ = comps.policy.generate(rows, 1, seed=None)
    fields = {"answer": [r["answer"] for r in rows], "completion_length": mask.sum(-1).tolist()}
    failures_before = sum(comps.reward.failure_totals.values())
    b = baseline(rows, 1)
    assert sum(comps.reward.failure_totals.values()) == failures_before
    torch.testing.assert_close(b, comps.reward(texts, fields).total)


# ------------------------------------------------------------------ 6. A-LoL value-head baseline


def test_alol_value_head_baseline(tmp_path, acc):
    cfg = _cfg(tmp_path, task={"offline": "scored"}, rewards=[{"name": "test_offline_const10"}],
               rollout={"source": "offline", "samples_per_prompt": 1},
               algorithm={"objective": "alol", "advantage": "alol", "beta": 0.0, "value_epochs": 10,
                          "value_lr": 0.1},
               train={"micro_batch_size": 4, "grad_accum_steps": 1})
    torch.manual_seed(0)
    comps = build_components(cfg, acc)
    policy, task = comps.policy, comps.task
    policy.build_reference()
    completed = []
    real_generate = policy.generate
    policy.generate = lambda rows, *a, **k: completed.extend(rows) or real_generate(rows, *a, **k)
    baseline = build_baseline("alol", policy, task, comps.reward, cfg, acc)
    assert completed == task.split("val")  # fit on the reference's greedy outputs of the validation split

    rows = task.split("train")[:6]
    v = baseline(rows, 1)
    assert v.shape == (6,) and v.dtype == torch.float32
    assert torch.isfinite(v).all() and (v <= 1.0).all()
    assert float(v.max()) > 0.5  # pushed toward the reward 10, held at the clamp
    # V(x) reads the frozen reference: training the policy leaves it unchanged
    _perturb(policy.module, scale=0.5)
    torch.testing.assert_close(baseline(rows, 2), v, atol=0, rtol=0)


# ------------------------------------------------------------------ 7. ASFT full-vocabulary KL


def _batch(policy):
    return policy.rollout_from(ROWS, [["12", "7"], ["301", ""]], 0)  # completion lengths 3, 2, 4, 1


def _direct_vocab_kl(policy, batch):
    T = batch.mask.shape[1]
    with torch.no_grad():
        ref = _plain_logits(policy._reference.model, batch.inputs, T).log_softmax(-1)
    cur = _plain_logits(policy.module.model, batch.inputs, T).log_softmax(-1)
    return (ref.exp() * (ref - cur)).sum(-1) * batch.mask


def test_asft_vocab_kl(tok):
    policy = _policy(tok)
    batch = _batch(policy)
    policy.build_reference()
    out = policy.log_probs(batch, vocab_kl=True)
    assert len(out) == 3 and set(out[2]) == {"vocab_kl"}
    assert out[2]["vocab_kl"].shape == batch.mask.shape
    assert out[2]["vocab_kl"].abs().max() < 1e-6

    _perturb(policy.module)
    logp, _, aux = policy.log_probs(batch, vocab_kl=True)
    kl = aux["vocab_kl"]
    assert torch.equal(logp, policy.log_probs(batch)[0])
    mask = batch.mask.bool()
    assert (kl[~mask] == 0).all() and (kl[mask] > 1e-4).all()
    torch.testing.assert_close(kl, _direct_vocab_kl(policy, batch), atol=1e-5, rtol=0)

    # gradient reaches the policy, never the frozen reference
    policy.module.zero_grad(set_to_none=True)
    kl.sum().backward()
    grads = [p.grad for p in policy.module.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None and not p.requires_grad for p in policy._reference.parameters())


def test_vocab_kl_needs_a_reference(tok):
    policy = _policy(tok)
    with pytest.raises(RuntimeError, match="build_reference"):
        policy.log_probs(_batch(policy), vocab_kl=True)


# ------------------------------------------------------------------ 8. IFT temporal-residual forward


def test_ift_residual_forward(tok):
    policy = _policy(tok)
    batch = _batch(policy)
    with torch.no_grad():
        plain = policy.log_probs(batch)[0]
        assert torch.equal(policy.log_probs(batch, residual_lambda=0.0)[0], plain)
        res = policy.log_probs(batch, residual_lambda=0.2)[0]
    mask = batch.mask.bool()
    assert (res[~mask] == 0).all()
    torch.testing.assert_close(res[:, 0], plain[:, 0], atol=1e-6, rtol=0)  # the first token sees only the prompt
    assert not torch.allclose(res[mask], plain[mask], atol=1e-4)


def test_ift_residual_embeddings(tok):
    policy = _policy(tok)
    batch = _batch(policy)
    module = policy.module
    ids, am, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.mask
    T, lam = mask.shape[1], 0.2
    embed = module.model.get_input_embeddings()

    def expected():
        with torch.no_grad():
            pred = _plain_logits(module.model, batch.inputs, T).argmax(-1)
            pred = torch.where(mask.bool(), pred, ids[:, -T:])
            e = embed(ids)
            return torch.cat([e[:, :-T], (1 - lam) * e[:, -T:] + lam * embed(pred)], 1)

    with torch.no_grad():
        first = module.residual_embeddings(ids, am, mask, lam)
    torch.testing.assert_close(first, expected(), atol=1e-6, rtol=0)

    # only (1 - lam) E(y_t) and the prompt embeddings carry gradient; the prediction's embedding does not
    module.zero_grad(set_to_none=True)
    module.residual_embeddings(ids, am, mask, lam).sum().backward()
    weight = torch.zeros(embed.weight.shape[0])
    weight.index_add_(0, ids[:, :-T].flatten(), torch.ones(ids[:, :-T].numel()))
    weight.index_add_(0, ids[:, -T:].flatten(), torch.full((ids[:, -T:].numel(),), 1 - lam))
    if embed.padding_idx is not None:  # nn.Embedding never updates its padding row
        weight[embed.padding_idx] = 0.0
    torch.testing.assert_close(embed.weight.grad, weight.unsqueeze(-1).expand_as(embed.weight.grad),
                               atol=1e-6, rtol=0)

    # the prompt positions are the live embeddings (as in the ordinary forward): they follow a weight update
    with torch.no_grad():
        embed.weight.add_(0.1)
        second = module.residual_embeddings(ids, am, mask, lam)
    torch.testing.assert_close(second[:, :-T], embed(ids)[:, :-T].detach(), atol=0, rtol=0)
    assert not torch.allclose(second[:, :-T], first[:, :-T])
    torch.testing.assert_close(second, expected(), atol=1e-6, rtol=0)


def test_ift_loss_backward_through_residual_forward(tmp_path, tok):
    from shared.aggregation import StepNorm
    from shared.objectives import OBJECTIVES

    cfg = _cfg(tmp_path, algorithm={"objective": "ift", "advantage": "none", "beta": 0.0, "ift_lambda": 0.2})
    objective = OBJECTIVES["ift"]
    opts = objective.forward_options(cfg.algorithm)
    assert opts == {"residual_lambda": 0.2}
    policy = _policy(tok)
    batch = _batch(policy)
    logp, _ = policy.log_probs(batch, **opts)
    norm = StepNorm(float(batch.mask.sum()), float(len(batch)), 1.0)
    loss, _ = objective(logp, logp.detach(), None, torch.ones(len(batch)), batch.mask, cfg.algorithm, norm)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = [p.grad for p in policy.module.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------ 9. expert-iteration flags


def test_first_in_group():
    flags = first_in_group(["3", "3", "4", "3"], torch.tensor([0, 0, 0, 1]))
    assert flags.tolist() == [1.0, 0.0, 1.0, 1.0] and flags.dtype == torch.float32


def test_copg_trains_on_off_policy_pairs(tmp_path):
    """CoPG needs no importance weights, so the same objective runs on offline pairs (here the data's
    correct / mistaken answers): at step 1 (policy = reference) its loss is the squared reward gap of
    each pair, 1/(2-1) * (1 - 0)^2 = 1."""
    from shared import loop

    d = _dpo_dict(tmp_path)
    d["algorithm"] = dict(d["algorithm"], objective="copg", beta=0.1)
    loop.train(validate_config(d, "test"))
    rows = [json.loads(l) for l in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(1.0, abs=1e-5)
    assert all(math.isfinite(r["loss"]) for r in steps)
