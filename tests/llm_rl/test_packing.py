"""Padding-free packed sequences (llm_rl/packing.py, LMForward(packed=True)): pack/unpack, positions,
the block-causal mask, and equality with the padded forward on a real tiny Qwen2ForCausalLM (fp32):
log-probs, entropies and parameter gradients."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from llm_rl.packing import (
    block_causal_mask,
    pack,
    pack_values,
    packed_attention_mask,
    unpack,
)
from llm_rl.policy import LMForward
from tests.helpers.layouts import (
    ATOL,
    VOCAB,
    assert_same_grads,
    forward_and_grads,
    tiny_lm,
)

P, T = 7, 6
# (prompt length, completion length) per row: left padding in prompts, right padding in completions,
# one row that is all padding, one full row
LENGTHS = [(7, 6), (3, 2), (0, 0), (5, 4), (1, 6), (4, 1)]


def _batch(lengths=LENGTHS, seed=0):
    """(input_ids [B, P+T], attention_mask, completion mask [B, T]) in the rollout layout."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    ids = torch.randint(1, VOCAB, (B, P + T), generator=g)
    am = torch.zeros(B, P + T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, (p, c) in enumerate(lengths):
        am[i, P - p : P] = 1
        am[i, P : P + c] = 1
        mask[i, :c] = 1
    return ids.masked_fill(am == 0, 0), am, mask




# ---------------------------------------------------------------- pack / unpack


def test_pack_keeps_real_tokens_in_batch_order():
    ids, am, _ = _batch()
    packed = pack(ids, am)
    assert packed.input_ids.shape == (1, int(am.sum()))
    assert packed.input_ids[0].tolist() == ids[am.bool()].tolist()  # row-major: sequence after sequence
    assert packed.lengths.tolist() == [p + c for p, c in LENGTHS]
    assert packed.sequence_ids.tolist() == [i for i, (p, c) in enumerate(LENGTHS) for _ in range(p + c)]


def test_position_ids_restart_per_sequence_and_match_padded_positions():
    ids, am, _ = _batch()
    packed = pack(ids, am)
    expected = [j for p, c in LENGTHS for j in range(p + c)]
    assert packed.position_ids[0].tolist() == expected
    padded_positions = (am.cumsum(-1) - 1).clamp(min=0)
    assert packed.position_ids[0].tolist() == padded_positions[am.bool()].tolist()


def test_pack_unpack_round_trip_with_all_padding_row():
    ids, am, _ = _batch()
    x = torch.randn(*ids.shape, 3, requires_grad=True)
    packed = pack(ids, am)
    row = pack_values(packed, x)
    assert row.shape == (1, packed.num_tokens, 3)
    back = unpack(packed, row)
    torch.testing.assert_close(back, x * am[..., None])
    assert (back[2] == 0).all()  # the all-padding row comes back as zeros
    back.sum().backward()  # gradients flow to the real positions only
    torch.testing.assert_close(x.grad, am[..., None].float().expand_as(x))


def test_pack_of_a_batch_without_real_tokens_is_empty():
    ids = torch.zeros(2, 4, dtype=torch.long)
    packed = pack(ids, torch.zeros_like(ids))
    assert packed.num_tokens == 0 and packed.input_ids.shape == (1, 0)
    assert unpack(packed, torch.zeros(1, 0, 5)).shape == (2, 4, 5)


def test_pack_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must both be"):
        pack(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))


# ---------------------------------------------------------------- attention restriction


def _brute_force_mask(packed, window=None):
    seq, pos = packed.sequence_ids.tolist(), packed.position_ids[0].tolist()
    n = len(seq)
    return torch.tensor([[seq[q] == seq[k] and k <= q and (window is None or pos[q] - pos[k] < window)
                          for k in range(n)] for q in range(n)])


@pytest.mark.parametrize("window", [None, 2])
def test_block_causal_mask_is_block_diagonal_and_causal(window):
    ids, am, _ = _batch()
    packed = pack(ids, am)
    m = block_causal_mask(packed, sliding_window=window)
    assert m.shape == (1, 1, packed.num_tokens, packed.num_tokens) and m.dtype == torch.bool
    assert torch.equal(m[0, 0], _brute_force_mask(packed, window))
    f = block_causal_mask(packed, torch.float32, sliding_window=window)
    assert torch.equal(f == 0, m) and (f[~m] == torch.finfo(torch.float32).min).all()


def test_packed_attention_mask_per_backend():
    ids, am, _ = _batch()
    packed = pack(ids, am)
    full = ["full_attention"] * 2
    cfg = lambda impl, types=full: SimpleNamespace(_attn_implementation=impl, layer_types=types, sliding_window=3)
    assert packed_attention_mask(packed, cfg("flash_attention_2"), torch.bfloat16) is None  # positions suffice
    assert packed_attention_mask(packed, cfg("sdpa"), torch.float32).dtype == torch.bool
    assert packed_attention_mask(packed, cfg("eager"), torch.bfloat16).dtype == torch.bfloat16
    mixed = packed_attention_mask(packed, cfg("sdpa", ["full_attention", "sliding_attention"]), torch.float32)
    assert set(mixed) == {"full_attention", "sliding_attention"}
    assert torch.equal(mixed["sliding_attention"][0, 0], _brute_force_mask(packed, 3))
    with pytest.raises(ValueError, match="train.packed_sequences"):
        packed_attention_mask(packed, cfg("flex_attention"), torch.float32)
    with pytest.raises(ValueError, match="linear_attention"):
        packed_attention_mask(packed, cfg("sdpa", ["full_attention", "linear_attention"]), torch.float32)


# ---------------------------------------------------------------- LMForward: packed == padded




@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_log_probs_entropies_and_grads_match_padded(attn, temperature):
    model = tiny_lm(attn)
    ids, am, mask = _batch()
    padded = LMForward(model, temperature, chunk_size=5)
    packed = LMForward(copy.deepcopy(model), temperature, chunk_size=5, packed=True)
    lp0, ent0, g0 = forward_and_grads(padded, ids, am, mask)
    lp1, ent1, g1 = forward_and_grads(packed, ids, am, mask)
    torch.testing.assert_close(lp1, lp0, atol=ATOL, rtol=0)
    torch.testing.assert_close(ent1, ent0, atol=ATOL, rtol=0)
    assert (lp1[mask == 0] == 0).all() and (lp1[2] == 0).all()  # padding and the all-padding row
    assert_same_grads(g1, g0, len(list(model.parameters())))


def test_packed_hidden_states_match_padded_at_real_tokens_and_are_zero_at_padding():
    model = tiny_lm()
    ids, am, _ = _batch(seed=3)
    with torch.no_grad():
        h0 = LMForward(model).hidden_states(ids, am)
        h1 = LMForward(model, packed=True).hidden_states(ids, am)
    real = am.bool()
    torch.testing.assert_close(h1[real], h0[real], atol=ATOL, rtol=0)
    assert (h1[~real] == 0).all()


def test_packed_sliding_window_layers_match_padded():
    """A model mixing full and sliding-window layers gets one mask per layer type."""
    model = tiny_lm(use_sliding_window=True, sliding_window=3, max_window_layers=1)
    assert set(model.config.layer_types) == {"full_attention", "sliding_attention"}
    ids, am, mask = _batch(seed=1)
    with torch.no_grad():
        lp0, ent0 = LMForward(model)(ids, am, mask, with_entropy=True)
        lp1, ent1 = LMForward(model, packed=True)(ids, am, mask, with_entropy=True)
    torch.testing.assert_close(lp1, lp0, atol=ATOL, rtol=0)
    torch.testing.assert_close(ent1, ent0, atol=ATOL, rtol=0)


def test_packed_residual_forward_matches_padded():
    """IFT's residual forward feeds input embeddings: they are packed like the token ids."""
    model = tiny_lm()
    ids, am, mask = _batch(seed=2)
    with torch.no_grad():
        lp0, _ = LMForward(model)(ids, am, mask, residual_lambda=0.3)
        lp1, _ = LMForward(model, packed=True)(ids, am, mask, residual_lambda=0.3)
    torch.testing.assert_close(lp1, lp0, atol=ATOL, rtol=0)


def test_packed_with_lora_matches_padded():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_lm(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ids, am, mask = _batch(seed=4)
    lp0, _, g0 = forward_and_grads(LMForward(model), ids, am, mask)
    lp1, _, g1 = forward_and_grads(LMForward(model, packed=True), ids, am, mask)
    torch.testing.assert_close(lp1, lp0, atol=ATOL, rtol=0)
    assert g0 and g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=ATOL, rtol=1e-4, msg=name)


def test_packed_batch_of_empty_completions_still_builds_a_graph():
    """A fully masked micro-batch (dynamic-sampling filler) gives zero log-probs and a zero gradient."""
    model = tiny_lm()
    ids, am, mask = _batch([(3, 0), (5, 0)])
    logp, _ = LMForward(model, packed=True)(ids, am, mask)
    assert (logp == 0).all() and logp.requires_grad
    logp.sum().backward()
    assert all(p.grad is not None and (p.grad == 0).all() for p in model.parameters())


def test_packing_is_text_only():
    from vision_rl.policy import VLMForward

    with pytest.raises(ValueError, match="train.packed_sequences.*VLMForward"):
        VLMForward(tiny_lm(), packed=True)


def test_config_threads_packed_sequences_to_the_policy(tmp_path):
    from llm_rl.recipe import load_model, make_policy
    from shared.config import validate_config
    from tests.helpers.tiny import tiny_config_dict

    for flag in (False, True):
        cfg = validate_config(tiny_config_dict(tmp_path, train={"packed_sequences": flag}))
        model, tok = load_model(cfg)
        assert make_policy(model, tok, cfg).module.packed is flag


def test_training_step_on_the_loop_is_unchanged_by_packing(tmp_path):
    """One RL step (a single optimizer step) of the tiny arithmetic run, with a KL to a reference copy: its loss,
    KL, entropy and gradient norm are the same with and without packing (rollouts come from `generate` in both)."""
    import json

    from shared.config import validate_config
    from shared.loop import train
    from tests.helpers.tiny import tiny_config_dict

    metrics = {}
    for flag in (False, True):
        name = f"packed_{flag}"
        d = tiny_config_dict(tmp_path, name=name, train={"steps": 1, "grad_accum_steps": 4, "packed_sequences": flag},
                             logging={"tensorboard": False, "plots": False})
        train(validate_config(d))
        rows = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        metrics[flag] = next(r for r in rows if "loss" in r)
    for key in ("loss", "kl_ref", "entropy", "grad_norm", "reward/total"):
        assert metrics[True][key] == pytest.approx(metrics[False][key], rel=1e-4, abs=1e-6), key
