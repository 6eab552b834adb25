"""Group rollout with a shared prefill (vision_rl/generation.py) against the per-sample path.

VLMPolicy samples n > 1 completions per prompt by running the vision tower and the prompt prefill once per
prompt and decoding the n samples from the repeated KV cache. With counter-based sampling the result must be
exactly what generating from n copies of each prompt gives (`share_prefill=False`): same token ids, texts,
masks and rollout tensors, for tiny Qwen2-VL and Qwen2.5-VL models, prompts with three image sizes (so left
padding and different M-RoPE grids), sampled and greedy, with EOS at any step (the first one included).

The tiny models' non-embedding matrices are scaled up (x8): at their initial scale (std 0.02) the logits are
nearly flat, so tokens would hardly depend on the image features or the M-RoPE positions and an equality
check would prove little. `test_equality_detects_wrong_positions` shows the check notices a position error.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList

from tests.vision_rl.test_policy import MAX_PX, MIN_PX, MODEL, ROWS
from vision_rl.embedded import build_model, build_processor, build_tokenizer
from vision_rl.generation import generate_shared_prefill
from vision_rl.policy import VLMPolicy
from vision_rl.tasks.shapes import tokenizer_corpus

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
N = 3
MAX_NEW = 12


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(*tokenizer_corpus())


def _sharp_model(tok, family):
    """A tiny model whose logits depend on its inputs (non-embedding matrices x8, see the module docstring)."""
    torch.manual_seed(0)
    model = build_model(tok, family, **MODEL)
    text = model.config.text_config
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed_tokens" not in name:
                p.mul_(8.0)
    return model


def _pair(tok, family, many_eos=False, max_new_tokens=MAX_NEW):
    """(shared-prefill policy, per-sample policy) on one model and processor. `many_eos` declares a quarter of
    the vocabulary end-of-sequence, so samples stop at every step, the first one included."""
    model = _sharp_model(tok, family)
    processor = build_processor(tok, family, MIN_PX, MAX_PX)
    kw = dict(min_pixels=MIN_PX, max_pixels=MAX_PX, max_new_tokens=max_new_tokens)
    shared = VLMPolicy(model, processor, **kw)
    per_sample = VLMPolicy(model, processor, share_prefill=False, **kw)
    assert shared.share_prefill and not per_sample.share_prefill
    if many_eos:
        eos = [i for i in range(len(tok)) if i % 4 == 0 and i not in shared.suppress_ids]
        shared.eos_ids = per_sample.eos_ids = eos
    return shared, per_sample


def _sample(policy, seed, n=N):
    return policy.sample(ROWS, n, seed=seed, first_sample_id=5, first_group_id=0)


def _assert_same(a, b):
    assert a.completions == b.completions
    assert torch.equal(a.mask, b.mask)
    assert a.inputs.keys() == b.inputs.keys()
    for k in a.inputs:
        assert torch.equal(a.inputs[k], b.inputs[k]), k
    assert {k: v for k, v in a.stats.items() if k != "sample_seconds"} == \
           {k: v for k, v in b.stats.items() if k != "sample_seconds"}


def _completion_ids(r) -> list[list[int]]:
    T = r.mask.shape[1]
    return [r.inputs["input_ids"][i, -T:][r.mask[i].bool()].tolist() for i in range(len(r.mask))]


@pytest.mark.parametrize("seed", [0, 7, None], ids=["seed0", "seed7", "greedy"])
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefill_equals_per_sample_rollout(tok, family, seed):
    shared, per_sample = _pair(tok, family)
    a, b = _sample(shared, seed), _sample(per_sample, seed)
    _assert_same(a, b)
    ids = _completion_ids(a)
    assert len({tuple(x) for x in ids}) >= len(ROWS)  # the prompts (images) give different completions
    if seed is not None:  # each sample has its own noise: a group's samples differ
        for g in range(len(ROWS)):
            assert len({tuple(x) for x in ids[g * N : (g + 1) * N]}) > 1
    assert a.inputs["pixel_values"].shape[0] == len(ROWS) * N  # the rollout still stores per-sample inputs


@pytest.mark.parametrize("seed", [1, None], ids=["seed1", "greedy"])
@pytest.mark.parametrize("family", FAMILIES)
def test_eos_at_any_step_including_the_first(tok, family, seed):
    """The first token comes from the shared prefill, before generate takes over: a sample that ends there must
    stay ended, and the completions are as wide as the longest one, as in the per-sample path."""
    shared, per_sample = _pair(tok, family, many_eos=True)
    steps = []
    hook = shared.module.model.model.language_model.register_forward_hook(lambda *args: steps.append(1))
    try:
        a = _sample(shared, seed)
    finally:
        hook.remove()
    b = _sample(per_sample, seed)
    _assert_same(a, b)
    lengths = a.mask.sum(-1)
    assert a.mask.shape[1] == int(lengths.max()) < MAX_NEW  # all ended early: the batch stops at the longest
    assert len(steps) == a.mask.shape[1]  # no decoding past it (an EOS picked from the prefill counts as one)
    if seed is not None:
        assert (lengths == 1).any() and (lengths > 1).any()  # EOS as the shared prefill's token, and later


@pytest.mark.parametrize("family", FAMILIES)
def test_one_new_token(tok, family):
    shared, per_sample = _pair(tok, family, max_new_tokens=1)
    a, b = _sample(shared, 3), _sample(per_sample, 3)
    _assert_same(a, b)
    assert a.mask.shape == (len(ROWS) * N, 1)


def _counted_sample(policy):
    """(rollout, images per vision-tower call, (batch, length) of each language-model forward)."""
    core = policy.module.model.model
    vision_calls, lm_inputs = [], []
    hooks = [
        core.visual.register_forward_hook(
            lambda mod, args, kwargs, out: vision_calls.append(len(kwargs["grid_thw"])), with_kwargs=True),
        core.language_model.register_forward_hook(
            lambda mod, args, kwargs, out: lm_inputs.append(tuple(kwargs["inputs_embeds"].shape[:2])),
            with_kwargs=True),
    ]
    try:
        return _sample(policy, 0), vision_calls, lm_inputs
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tower_and_prefill_run_once_per_prompt(tok, family):
    P = len(ROWS)
    for policy, rows_encoded in zip(_pair(tok, family), (P, N * P)):  # shared prefill, then per sample
        before = policy.processor_calls
        r, vision_calls, lm_inputs = _counted_sample(policy)
        assert policy.processor_calls - before == P
        assert vision_calls == [rows_encoded]  # one vision forward: the P images once, or N * P images
        Lp = r.inputs["input_ids"].shape[1] - r.mask.shape[1]
        assert lm_inputs[0] == (rows_encoded, Lp)  # one prefill of the whole prompt, P or N * P rows
        assert set(lm_inputs[1:]) == {(N * P, 1)}  # then one token per sample per step
        assert len(lm_inputs) == r.mask.shape[1]


def test_single_sample_uses_the_plain_path(tok):
    shared, per_sample = _pair(tok, "qwen2_vl")
    _assert_same(_sample(shared, 2, n=1), _sample(per_sample, 2, n=1))


@pytest.mark.parametrize("family", FAMILIES)
def test_equality_detects_wrong_positions(tok, family, monkeypatch):
    """Dropping the M-RoPE deltas when the cache is expanded (decode positions off by the image's offset) changes
    the completions: the equality tests above do depend on the positions being carried over."""
    shared, per_sample = _pair(tok, family)
    expected = _sample(per_sample, 0).completions
    core = shared.module.model.model
    real = DynamicCache.batch_repeat_interleave

    def expand_and_forget_deltas(cache, repeats):
        real(cache, repeats)
        core.rope_deltas = torch.zeros_like(core.rope_deltas)

    monkeypatch.setattr(DynamicCache, "batch_repeat_interleave", expand_and_forget_deltas)
    assert _sample(shared, 0).completions != expected


def test_sampling_inside_generate_is_refused(tok):
    shared, _ = _pair(tok, "qwen2_vl")
    enc = shared.encode_rows(ROWS, "cpu")
    cfg = GenerationConfig(do_sample=True, max_new_tokens=2, eos_token_id=shared.eos_ids, pad_token_id=shared.pad_id)
    with pytest.raises(ValueError, match="do_sample=False"):
        generate_shared_prefill(shared.module.model, shared.generation_inputs(enc), N, cfg, LogitsProcessorList())
