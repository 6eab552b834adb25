"""VLMPolicy / VLMForward (vision_rl/policy.py) on tiny Qwen2-VL and Qwen2.5-VL models built in-process with
the real processors: save/load, M-RoPE positions under left padding, the deduplicated vision forward
against a plain HF forward (values and gradients), image reuse, sampling invariance, prompt limits,
suppressed vision tokens, LoRA placement and `Rollout.cat` of rollouts with different image sizes."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

from shared.rollout import Rollout
from tests.helpers.tiny import ROOT
from vision_rl.coords import BoxCoder
from vision_rl.embedded import build_model, build_processor, build_tokenizer
from vision_rl.policy import VLMPolicy
from vision_rl.tasks.shapes import ShapesTask, ShapesTaskConfig, tokenizer_corpus

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
MIN_PX, MAX_PX = 3136, 6272
MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, vision_depth=1, vision_dim=32)
N = 3  # samples per prompt
ATOL = 1e-5


@cache
def _task_rows(kind: str, size: tuple[int, int], n: int = 3) -> tuple[dict, ...]:
    cfg = ShapesTaskConfig(kind=kind, image_size=size, min_pixels=MIN_PX, max_pixels=MAX_PX, min_size=8, max_size=20,
                           max_objects=2, sft_size=0, val_size=0, eval_size=n, train_size=1)
    return tuple(ShapesTask(cfg, BoxCoder("relative_1000", MIN_PX, MAX_PX)).split("eval"))


# Three kinds and three image sizes (4, 6 and 8 image tokens): the prompts have different lengths, so the
# batch is left-padded, and the M-RoPE grids differ in height and width. image_ids are 1, 2, 3.
ROWS = [_task_rows("classification", (56, 56))[0], _task_rows("detection", (84, 56))[1],
        _task_rows("grounding", (56, 112))[2]]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(*tokenizer_corpus())


def _model(tok, family, seed=0):
    torch.manual_seed(seed)
    return build_model(tok, family, **MODEL)


def _policy(tok, family, model=None, processor=None, temperature=1.0, max_new_tokens=8, **kw):
    model = model if model is not None else _model(tok, family)
    processor = processor if processor is not None else build_processor(tok, family, MIN_PX, MAX_PX)
    return VLMPolicy(model, processor, min_pixels=MIN_PX, max_pixels=MAX_PX, temperature=temperature,
                     max_new_tokens=max_new_tokens, **kw)


def _sample(policy, rows=ROWS, n=N, seed=0, first_sample_id=0):
    return policy.sample(rows, n, seed=seed, first_sample_id=first_sample_id, first_group_id=0)


def _tokens(r: Rollout, i: int) -> list[int]:
    T = r.mask.shape[1]
    return r.inputs["input_ids"][i, -T:][r.mask[i].bool()].tolist()


def _flat_pixels(inputs: dict) -> torch.Tensor:
    sizes = inputs["image_grid_thw"].prod(-1).tolist()
    return torch.cat([inputs["pixel_values"][i, :n] for i, n in enumerate(sizes)])


def _plain_log_probs(model, inputs: dict, mask, temperature=1.0, suppress=()):
    """Twin of VLMForward: the full HF model on every sample's own image (no dedup, no mm_encoder_outputs),
    full-vocabulary logits with the never-generated tokens at -inf, log_softmax, gather."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   pixel_values=_flat_pixels(inputs), image_grid_thw=inputs["image_grid_thw"],
                   mm_token_type_ids=inputs["mm_token_type_ids"]).logits
    T = mask.shape[1]
    logits = logits[:, -T - 1 : -1].float()
    logits[..., list(suppress)] = float("-inf")
    logp = torch.log_softmax(logits / temperature, -1)
    return logp.gather(-1, inputs["input_ids"][:, -T:].unsqueeze(-1)).squeeze(-1) * mask


def test_rows_have_different_prompt_lengths(tok):
    enc = _policy(tok, "qwen2_vl").encode_rows(ROWS, "cpu")
    lengths = enc["attention_mask"].sum(-1).tolist()
    assert lengths[0] < lengths[1] < lengths[2] and (enc["attention_mask"] == 0).any()  # left padding is exercised
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6], [1, 8, 4]]  # (t, h, w) patches
    assert enc["pixel_values"].shape[:2] == (3, 32)  # zero-padded to the largest image


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(tok, tmp_path, family):
    policy = _policy(tok, family, temperature=0.7)
    with torch.no_grad():  # move off the init so a silently re-initialised load would show
        policy.module.model.model.language_model.layers[0].mlp.up_proj.weight.add_(0.1)
        policy.module.model.model.visual.blocks[0].attn.qkv.weight.add_(0.1)
    greedy = policy.complete(ROWS)
    r = _sample(policy)
    with torch.no_grad():
        lp = policy.log_probs(r)[0]
    policy.save_pretrained(tmp_path)

    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(model) is type(policy.module.model)
    assert type(processor) is type(policy.processor)
    assert type(processor.image_processor) is type(policy.processor.image_processor)
    sd0, sd1 = policy.module.model.state_dict(), model.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k

    loaded = _policy(tok, family, model, processor, temperature=0.7)
    enc0, enc1 = policy.encode_rows(ROWS, "cpu"), loaded.encode_rows(ROWS, "cpu")
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(enc0[k], enc1[k]), k
    assert loaded.suppress_ids == policy.suppress_ids and len(loaded.suppress_ids) == 4
    assert loaded.complete(ROWS) == greedy
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_probs(r)[0], lp, atol=1e-6, rtol=0)
    r2 = _sample(loaded)
    assert r2.completions == r.completions and torch.equal(r2.inputs["input_ids"], r.inputs["input_ids"])


# ---------------------------------------------------------------- log-probs vs generate / plain forward


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_log_probs_match_generate_scores(tok, family):
    """The training forward's M-RoPE position ids under left padding must match those `generate` uses."""
    policy = _policy(tok, family, max_new_tokens=10)
    model = policy.module.model
    inputs, mask, _, _ = policy.generate(ROWS, n=1, seed=None)
    r = Rollout(inputs=inputs, mask=mask, group_ids=torch.arange(len(ROWS)))

    enc = policy.encode_rows(ROWS, "cpu")
    Lp = enc["input_ids"].shape[1]
    cfg = GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=policy.eos_ids, pad_token_id=policy.pad_id,
                           suppress_tokens=policy.suppress_ids)
    model.eval()
    with torch.no_grad():
        out = model.generate(**policy.generation_inputs(enc), generation_config=cfg, output_scores=True,
                             output_logits=True, return_dict_in_generate=True)
        lp = policy.log_probs(r)[0]
    gen = out.sequences[:, Lp:]
    T = mask.shape[1]
    assert gen.shape[1] == T == len(out.scores) and mask.sum() > len(ROWS)
    assert torch.equal(gen.masked_fill(mask == 0, policy.pad_id), inputs["input_ids"][:, Lp:])

    # The scores are the logits with the vision tokens suppressed (-inf): the policy's log-probs are taken
    # under that same distribution, so they equal the log-softmax of the scores ...
    scores = torch.stack([s.float() for s in out.scores], 1)
    logp_scores = torch.log_softmax(scores, -1).gather(-1, gen.unsqueeze(-1)).squeeze(-1) * mask
    torch.testing.assert_close(lp, logp_scores, atol=ATOL, rtol=0)
    # ... and differ from the raw logits' log-softmax by exactly log(1 - p(vision tokens)).
    logits = torch.stack([s.float() for s in out.logits], 1)  # raw logits [B, T, V]
    logp_raw = torch.log_softmax(logits, -1).gather(-1, gen.unsqueeze(-1)).squeeze(-1) * mask
    p_vision = torch.softmax(logits, -1)[..., policy.suppress_ids].sum(-1)
    torch.testing.assert_close(lp, (logp_raw - torch.log1p(-p_vision)) * mask, atol=ATOL, rtol=0)
    for t, s in enumerate(out.scores):  # greedy tokens are the argmax of each step's scores
        live = mask[:, t].bool()
        assert torch.equal(s.argmax(-1)[live], gen[live, t])


@pytest.mark.parametrize("family", FAMILIES)
def test_log_probs_and_gradients_match_plain_forward(tok, family):
    """The vision tower runs once per distinct image and its features go through mm_encoder_outputs;
    values and gradients (vision tower included) equal the plain model on every sample's own image."""
    policy = _policy(tok, family, temperature=0.7, chunk_size=5)
    model = policy.module.model
    model.requires_grad_(True)
    r = _sample(policy)
    assert r.mask.sum() > 0
    coef = torch.randn(r.mask.shape, generator=torch.Generator().manual_seed(0))

    def grads(lp):
        model.zero_grad(set_to_none=True)
        (lp * coef).sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    lp, got = grads(policy.log_probs(r)[0])
    ref_lp, ref = grads(_plain_log_probs(model, r.inputs, r.mask, 0.7, policy.suppress_ids))
    torch.testing.assert_close(lp, ref_lp, atol=ATOL, rtol=0)
    assert (lp[r.mask == 1] < 0).all() and (lp[r.mask == 0] == 0).all()
    assert got.keys() == ref.keys()
    assert any(".visual." in n for n in got) and any("language_model" in n for n in got)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=ATOL, rtol=1e-4, msg=n)


def test_frozen_vision_tower_gets_no_gradient(tok):
    policy = _policy(tok, "qwen2_vl")
    model = policy.module.model
    model.model.visual.requires_grad_(False)
    r = _sample(policy, n=2)
    policy.log_probs(r)[0].sum().backward()
    assert all(p.grad is None for p in model.model.visual.parameters())
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad is not None


# ---------------------------------------------------------------- image reuse


@pytest.mark.parametrize("family", FAMILIES)
def test_images_processed_once_per_prompt_and_encoded_once_per_image(tok, family, monkeypatch):
    policy = _policy(tok, family)
    proc_type = type(policy.processor)
    real_call = proc_type.__call__
    images_per_call = []

    def counting_call(self, *args, **kwargs):
        images_per_call.append(len(kwargs["images"]))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(proc_type, "__call__", counting_call)
    P = len(ROWS)
    before = policy.processor_calls
    r = _sample(policy, n=4)
    assert images_per_call == [P]  # one processor call for the batch, one image per prompt (not per sample)
    assert policy.processor_calls - before == P
    # the G samples of a prompt share its pixel tensors and its image key
    keys = r.inputs["image_key"]
    assert len(set(keys.tolist())) == P
    for g in range(P):
        rows = slice(4 * g, 4 * g + 4)
        assert (keys[rows] == keys[4 * g]).all()
        assert (r.inputs["pixel_values"][rows] == r.inputs["pixel_values"][4 * g]).all()

    grids = []
    hook = policy.module.model.model.visual.register_forward_hook(
        lambda mod, args, kwargs, out: grids.append(kwargs.get("grid_thw", args[1] if len(args) > 1 else None)),
        with_kwargs=True)
    try:
        with torch.no_grad():
            policy.log_probs(r)
            policy.log_probs(r.select([0, 1, 5, 9, 10]))  # a micro-batch with samples of all three images
            policy.log_probs(r.select([5, 9, 4]))  # two distinct images
    finally:
        hook.remove()
    grid = r.inputs["image_grid_thw"]
    assert [g.tolist() for g in grids] == [grid[[0, 4, 8]].tolist()] * 2 + [grid[[4, 8]].tolist()]


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_batch_invariant(tok, family):
    policy = _policy(tok, family)
    full = _sample(policy, ROWS, N, seed=7, first_sample_id=0)
    for i in (0, 1):  # each row alone (no left padding), with its global sample ids
        alone = _sample(policy, [ROWS[i]], N, seed=7, first_sample_id=i * N)
        assert full.completions[i * N : (i + 1) * N] == alone.completions
        for j in range(N):
            assert _tokens(full, i * N + j) == _tokens(alone, j)
    wrong = _sample(policy, [ROWS[1]], N, seed=7, first_sample_id=0)
    assert wrong.completions != full.completions[N : 2 * N]


def test_prompt_longer_than_limit_is_an_error_naming_the_row(tok):
    lengths = _policy(tok, "qwen2_vl").encode_rows(ROWS, "cpu")["attention_mask"].sum(-1).tolist()
    assert lengths[0] < lengths[1] < lengths[2]
    policy = _policy(tok, "qwen2_vl", max_prompt_length=lengths[1])  # a prompt of exactly the limit is fine
    assert len(policy.complete(ROWS[:2])) == 2
    msg = rf"image_id={ROWS[2]['image_id']}\b.*max_prompt_length={lengths[1]}"
    with pytest.raises(ValueError, match=msg):
        _sample(policy, ROWS)
    with pytest.raises(ValueError, match=msg):
        policy.complete(ROWS)
    with pytest.raises(ValueError, match=msg):
        policy.demo_batch([dict(r, completion="1") for r in ROWS])


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tokens_never_generated(tok, family):
    policy = _policy(tok, family, max_new_tokens=12)
    ids = {tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                   "<|vision_end|>")}
    assert set(policy.suppress_ids) == ids

    def vision_tokens(r):
        T = r.mask.shape[1]
        comp = r.inputs["input_ids"][:, -T:][r.mask.bool()]
        return int(torch.isin(comp, torch.tensor(sorted(ids))).sum())

    r = _sample(policy, n=8, seed=5)
    assert r.mask.sum() > 150 and vision_tokens(r) == 0
    # the check has teeth: without suppression the same random model at temperature 1 emits them
    policy.suppress_ids = []
    assert vision_tokens(_sample(policy, n=8, seed=5)) > 0


# ---------------------------------------------------------------- LoRA


def _lora_cfg(family, freeze_vision, target_modules):
    from shared.config import validate_config

    return validate_config({
        "name": "lora", "domain": "vision",
        "model": {"name_or_path": "embedded", "freeze_vision": freeze_vision,
                  "lora": {"r": 4, "alpha": 8, "target_modules": target_modules}},
        "task": {"name": "shapes", "family": family, "image_size": [56, 56], "min_pixels": MIN_PX,
                 "max_pixels": MAX_PX, "min_size": 8, "max_size": 20, **MODEL},
        "rewards": [{"name": "format"}], "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2},
        "train": {"micro_batch_size": 4}})


def _lora_modules(model) -> set[str]:
    return {n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_" in n}


LORA_TARGETS = [["q_proj", "v_proj", "up_proj"], "all-linear"]


@pytest.mark.parametrize("targets", LORA_TARGETS, ids=["list", "all-linear"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_with_frozen_vision_adapts_only_the_language_model(tok, family, targets):
    from vision_rl.recipe import apply_lora, load_model

    cfg = _lora_cfg(family, True, targets)
    torch.manual_seed(0)
    model, processor = load_model(cfg)
    assert not any(p.requires_grad for p in model.model.visual.parameters())
    base = _policy(tok, family, model, processor)
    r = _sample(base)
    with torch.no_grad():
        base_lp = base.log_probs(r)[0]

    lora = apply_lora(model, cfg)
    names = _lora_modules(lora)
    assert names and all("language_model" in n for n in names)
    assert not any(".visual." in n for n, _ in lora.named_parameters() if ".lora_" in n)
    policy = _policy(tok, family, lora, processor)
    assert all(".lora_" in n for n, p in policy.module.named_parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(policy.log_probs(r)[0], base_lp, atol=ATOL, rtol=0)  # B = 0 at init
        g = torch.Generator().manual_seed(1)
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        lp = policy.log_probs(r)[0]
        ref = policy.reference_log_probs(r)
    assert (lp - base_lp).abs().max() > 1e-3
    torch.testing.assert_close(ref, base_lp, atol=ATOL, rtol=0)  # adapter disabled is the base model
    policy.build_reference()
    assert policy._reference is None  # no copy with LoRA


def test_lora_on_trained_vision_tower_reaches_matching_vision_modules(tok):
    from vision_rl.recipe import apply_lora, load_model

    cfg = _lora_cfg("qwen2_5_vl", False, ["q_proj", "v_proj", "up_proj"])
    model, _ = load_model(cfg)
    names = _lora_modules(apply_lora(model, cfg))
    assert any(".visual.blocks.0.mlp.up_proj" in n for n in names)  # Qwen2.5-VL's vision MLP reuses the name


# ---------------------------------------------------------------- Rollout.cat


@pytest.mark.parametrize("family", FAMILIES)
def test_rollout_cat_of_different_image_sizes_keeps_log_probs(tok, family):
    policy = _policy(tok, family)
    small = _sample(policy, list(_task_rows("detection", (56, 56))[:2]), n=2, seed=1)
    large = _sample(policy, list(_task_rows("detection", (56, 112))[:2]), n=2, seed=2, first_sample_id=4)
    assert small.inputs["pixel_values"].shape[1] == 16 and large.inputs["pixel_values"].shape[1] == 32
    both = Rollout.cat([small, large])
    assert both.inputs["pixel_values"].shape == (8, 32, small.inputs["pixel_values"].shape[2])
    with torch.no_grad():
        parts = [policy.log_probs(small)[0], policy.log_probs(large)[0]]
        lp = policy.log_probs(both)[0]
        for b in (slice(0, 8, 3), slice(2, 7)):  # micro-batches mixing the two sizes
            torch.testing.assert_close(policy.log_probs(both.select(b))[0], lp[b], atol=ATOL, rtol=0)
    T = both.mask.shape[1]
    expected = torch.cat([torch.nn.functional.pad(p, (0, T - p.shape[1])) for p in parts])
    torch.testing.assert_close(lp, expected, atol=ATOL, rtol=0)
    assert both.completions == small.completions + large.completions


def test_rollout_cat_equal_total_length_different_split(tok):
    policy = _policy(tok, "qwen2_vl")
    a = policy.demo_batch([dict(_task_rows("detection", (56, 56))[0], completion="1234567")])
    b = policy.demo_batch([dict(_task_rows("detection", (84, 56))[0], completion="12345")])
    assert a.inputs["input_ids"].shape == b.inputs["input_ids"].shape and a.mask.shape != b.mask.shape
    both = Rollout.cat([a, b])
    with torch.no_grad():
        lp_b = policy.log_probs(b)[0]
        lp = policy.log_probs(both)[0]
    torch.testing.assert_close(lp[1, : lp_b.shape[1]], lp_b[0], atol=ATOL, rtol=0)


def test_embedded_tokenizer_is_identical_in_every_process():
    """The warm-up cache and resumed runs rebuild the embedded tokenizer in a new process: its ids must
    not depend on Python's per-process string hashing (set iteration order)."""
    import os
    import subprocess
    import sys

    code = ("from vision_rl.embedded import build_tokenizer; from vision_rl.tasks.shapes import tokenizer_corpus; "
            "import json; print(json.dumps(sorted(build_tokenizer(*tokenizer_corpus()).get_vocab().items())))")
    vocabs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                             env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)}
    assert len(vocabs) == 1
