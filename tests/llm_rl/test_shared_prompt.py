"""Shared-prompt training forward (llm_rl/shared_prompt.py, LMForward(shared_prompt=True)): prompt grouping, and
equality with the plain padded forward on a real tiny Qwen2ForCausalLM (fp32): log-probs, entropies and parameter
gradients, with groups of G samples, left-padded prompts of different lengths, completions of different lengths,
rows of one prompt not contiguous and groups split across micro-batches; config checks; one loop step."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from llm_rl.policy import LMForward
from llm_rl.shared_prompt import prompt_groups, shared_prompt_hidden_states
from shared.config import ConfigError, validate_config
from tests.helpers.layouts import (
    ATOL,
    VOCAB,
    assert_same_grads,
    forward_and_grads,
    tiny_lm,
)
from tests.helpers.tiny import tiny_config_dict

P, T = 7, 6
PROMPT_LENGTHS = [7, 3, 5, 1]  # real tokens of each distinct prompt (left-padded to P)
# (prompt, completion length) per row: 3 groups of G = 3 with their rows interleaved, a prompt seen once,
# completions of every length from 1 to T
ROWS = [(0, 6), (1, 2), (0, 3), (2, 4), (1, 6), (2, 1), (0, 1), (3, 5), (1, 4), (2, 6)]


def _batch(rows=ROWS, seed=0):
    """(input_ids [B, P+T], attention_mask, completion mask [B, T]) in the rollout layout; the token under
    padding is random, so rows of one prompt differ there (it must not split a group)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in PROMPT_LENGTHS]
    B = len(rows)
    ids = torch.randint(1, VOCAB, (B, P + T), generator=g)
    am = torch.zeros(B, P + T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, (k, c) in enumerate(rows):
        n = len(prompts[k])
        ids[i, P - n : P] = prompts[k]
        am[i, P - n : P + c] = 1
        mask[i, :c] = 1
    return ids, am, mask








# ---------------------------------------------------------------- grouping


def test_prompt_groups_find_interleaved_rows_of_one_prompt():
    ids, am, _ = _batch()
    groups = prompt_groups(ids, am, P)
    assert groups.num_prompts == len(PROMPT_LENGTHS)
    for i, (k, _) in enumerate(ROWS):
        first = int(groups.first[groups.inverse[i]])
        assert ROWS[first][0] == k and first == min(j for j, (kj, _) in enumerate(ROWS) if kj == k)


def test_prompt_groups_compare_real_tokens_and_padding_layout():
    ids = torch.tensor([[0, 5, 6], [9, 5, 6], [5, 5, 6], [0, 5, 7]])
    am = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]])
    groups = prompt_groups(ids, am, 3)
    inv = groups.inverse.tolist()
    assert inv[0] == inv[1]  # the token under padding does not matter
    assert len({inv[0], inv[2], inv[3]}) == 3  # a longer prompt, another last token
    assert groups.first[inv[0]] == 0


# ---------------------------------------------------------------- LMForward: shared prompt == padded


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prompt_log_probs_entropies_and_grads_match_padded(attn, temperature):
    model = tiny_lm(attn)
    ids, am, mask = _batch()
    padded = LMForward(model, temperature, chunk_size=5)
    shared = LMForward(copy.deepcopy(model), temperature, chunk_size=5, shared_prompt=True)
    lp0, ent0, g0 = forward_and_grads(padded, ids, am, mask)
    lp1, ent1, g1 = forward_and_grads(shared, ids, am, mask)
    torch.testing.assert_close(lp1, lp0, atol=ATOL, rtol=0)
    torch.testing.assert_close(ent1, ent0, atol=ATOL, rtol=0)
    assert (lp1[mask == 0] == 0).all()
    assert_same_grads(g1, g0, len(list(model.parameters())))


def test_partial_groups_of_a_split_micro_batch_match_padded():
    """A micro-batch cut from the middle of a rollout: groups split between micro-batches, one row of a prompt
    alone, rows in any order; gradients accumulated over the micro-batches equal the padded ones."""
    model = tiny_lm()
    ids, am, mask = _batch()
    order = torch.tensor([9, 3, 0, 7, 5, 1, 8, 2, 6, 4])
    padded = LMForward(model, chunk_size=5)
    shared = LMForward(copy.deepcopy(model), chunk_size=5, shared_prompt=True)
    results = {}
    for name, module in (("padded", padded), ("shared", shared)):
        module.zero_grad(set_to_none=True)
        lps = []
        for part in (order[:4], order[4:5], order[5:]):
            logp, ent = module(ids[part], am[part], mask[part], with_entropy=True)
            (logp.sum() * 0.5 + ent.sum() * 0.1).backward()
            lps.append(logp.detach())
        results[name] = torch.cat(lps), {n: p.grad.clone() for n, p in module.named_parameters()}
    torch.testing.assert_close(results["shared"][0], results["padded"][0], atol=ATOL, rtol=0)
    assert_same_grads(results["shared"][1], results["padded"][1], len(list(model.parameters())))


def test_shared_prompt_hidden_states_match_padded_at_real_tokens():
    model = tiny_lm()
    ids, am, _ = _batch(seed=3)
    with torch.no_grad():
        h0 = LMForward(model).hidden_states(ids, am)
        h1 = shared_prompt_hidden_states(model.model, ids, am, T)
        h_no_split = LMForward(model, shared_prompt=True).hidden_states(ids, am)  # no completion_len: padded
    real = am.bool()
    assert h1.shape == h0.shape
    torch.testing.assert_close(h1[real], h0[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(h_no_split, h0)


def test_shared_prompt_sliding_window_layers_match_padded():
    """A model mixing full and sliding-window layers (window shorter than prompt and completion)."""
    model = tiny_lm(use_sliding_window=True, sliding_window=3, max_window_layers=1)
    assert set(model.config.layer_types) == {"full_attention", "sliding_attention"}
    ids, am, mask = _batch(seed=1)
    lp0, ent0, g0 = forward_and_grads(LMForward(model), ids, am, mask)
    lp1, ent1, g1 = forward_and_grads(LMForward(copy.deepcopy(model), shared_prompt=True), ids, am, mask)
    torch.testing.assert_close(lp1, lp0, atol=ATOL, rtol=0)
    torch.testing.assert_close(ent1, ent0, atol=ATOL, rtol=0)
    assert_same_grads(g1, g0, len(list(model.parameters())))


def test_shared_prompt_residual_forward_and_vocab_kl_match_padded():
    """IFT's residual forward (input embeddings) and ASFT's full-vocabulary KL to a reference copy."""
    model = tiny_lm()
    ids, am, mask = _batch(seed=2)
    out = {}
    for flag in (False, True):
        module = LMForward(model, shared_prompt=flag)
        reference = copy.deepcopy(module).requires_grad_(False)
        with torch.no_grad():
            reference.model.model.embed_tokens.weight.mul_(0.9)  # a reference that differs from the policy
            out[flag] = (module(ids, am, mask, residual_lambda=0.3)[0],
                         module(ids, am, mask, kl_reference=reference)[2]["vocab_kl"])
    for got, want in zip(out[True], out[False]):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_shared_prompt_with_lora_matches_padded():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_lm(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ids, am, mask = _batch(seed=4)
    lp0, _, g0 = forward_and_grads(LMForward(model), ids, am, mask)
    lp1, _, g1 = forward_and_grads(LMForward(model, shared_prompt=True), ids, am, mask)
    torch.testing.assert_close(lp1, lp0, atol=ATOL, rtol=0)
    assert g0
    assert_same_grads(g1, g0, len(g0))


def test_shared_prompt_batch_of_empty_completions_still_builds_a_graph():
    """A fully masked micro-batch (dynamic-sampling filler) gives zero log-probs and a zero gradient."""
    model = tiny_lm()
    ids, am, mask = _batch()
    logp, _ = LMForward(model, shared_prompt=True)(ids, am, torch.zeros_like(mask))
    assert (logp == 0).all() and logp.requires_grad
    logp.sum().backward()
    assert all(p.grad is not None and (p.grad == 0).all() for p in model.parameters())


# ---------------------------------------------------------------- refusals and config


def _one_line(msg: str) -> str:
    assert msg and "\n" not in msg
    return msg


def test_shared_prompt_is_text_only_and_not_packed():
    from vision_rl.policy import VLMForward

    with pytest.raises(ValueError, match=r"train\.shared_prompt.*VLMForward") as e:
        VLMForward(tiny_lm(), shared_prompt=True)
    _one_line(str(e.value))
    with pytest.raises(ValueError, match=r"train\.shared_prompt and train\.packed_sequences are exclusive"):
        LMForward(tiny_lm(), packed=True, shared_prompt=True)


def test_shared_prompt_refuses_activation_checkpointing_at_run_time():
    from shared.recipe import enable_activation_checkpointing

    model = tiny_lm()
    enable_activation_checkpointing(model)
    ids, am, mask = _batch()
    with pytest.raises(ValueError, match=r"train\.shared_prompt: activation checkpointing"):
        LMForward(model, shared_prompt=True).train()(ids, am, mask)


def test_config_rejects_shared_prompt_with_packing_or_checkpointing(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.shared_prompt and train\.packed_sequences are exclusive") as e:
        validate_config(tiny_config_dict(tmp_path, train={"shared_prompt": True, "packed_sequences": True}))
    _one_line(str(e.value))
    with pytest.raises(ConfigError, match=r"train\.shared_prompt: .*model\.gradient_checkpointing") as e:
        validate_config(tiny_config_dict(tmp_path, train={"shared_prompt": True},
                                         model={"gradient_checkpointing": True}))
    _one_line(str(e.value))
    assert validate_config(tiny_config_dict(tmp_path)).train.shared_prompt is False  # off by default


def test_shared_prompt_is_for_the_llm_domain_only(tmp_path):
    from shared.attention import check_attention
    from tests.vision_rl.test_vision_loop import vision_config_dict

    cfg = validate_config(vision_config_dict(tmp_path, train={"shared_prompt": True}))
    with pytest.raises(ConfigError, match=r"^train\.shared_prompt: .*domain 'llm'.*not domain 'vision'"):
        check_attention(cfg)
    check_attention(validate_config(tiny_config_dict(tmp_path, train={"shared_prompt": True})))  # llm: fine


def test_config_threads_shared_prompt_to_the_policy(tmp_path):
    from llm_rl.recipe import load_model, make_policy

    for flag in (False, True):
        cfg = validate_config(tiny_config_dict(tmp_path, train={"shared_prompt": flag}))
        model, tok = load_model(cfg)
        assert make_policy(model, tok, cfg).module.shared_prompt is flag


# ---------------------------------------------------------------- the loop


def test_training_step_on_the_loop_is_unchanged_by_shared_prompt(tmp_path, monkeypatch):
    """Two RL steps of the tiny arithmetic run (4 prompts x G = 4, two micro-batches of two groups each, a KL to a
    reference copy that uses the same forward). Rollouts come from `generate` in both runs, so the first step's
    batches are identical: the log-probs of its training micro-batches and its loss, KL, entropy and gradient
    norm are the same with and without the shared prompt; the run stays finite."""
    from shared import loop

    real_build = loop.build_components
    recorded: list[torch.Tensor] = []

    def build(cfg, acc):  # record the log-probs of every training forward (policy.log_probs) in the loop
        comps = real_build(cfg, acc)
        real_log_probs = comps.policy.log_probs

        def log_probs(batch, *a, **k):
            out = real_log_probs(batch, *a, **k)
            recorded.append(out[0].detach().clone())
            return out

        comps.policy.log_probs = log_probs
        return comps

    monkeypatch.setattr(loop, "build_components", build)
    metrics, logps = {}, {}
    for flag in (False, True):
        name = f"shared_{flag}"
        recorded.clear()
        train_cfg = {"steps": 2, "micro_batch_size": 8, "grad_accum_steps": 2, "shared_prompt": flag}
        d = tiny_config_dict(tmp_path, name=name, train=train_cfg,
                             checkpoint={"every": 0}, logging={"tensorboard": False, "plots": False})
        loop.train(validate_config(d))
        rows = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        metrics[flag] = [r for r in rows if "loss" in r]
        logps[flag] = list(recorded[:2])  # the first step's two training micro-batches
    assert len(metrics[True]) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics[True])
    for got, want in zip(logps[True], logps[False], strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    first = {flag: m[0] for flag, m in metrics.items()}
    for key in ("loss", "kl_ref", "entropy", "grad_norm", "reward/total"):
        assert first[True][key] == pytest.approx(first[False][key], rel=1e-5, abs=1e-6), key
