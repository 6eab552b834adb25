"""CausalLMPolicy / LMForward (llm_rl/policy.py) on a tiny Qwen2 model: log-probs, sampling, masks,
references (LoRA and full copy), save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2ForCausalLM

from llm_rl.policy import CausalLMPolicy, completion_mask
from llm_rl.tasks.arithmetic import ArithmeticTaskConfig, build_model, build_tokenizer
from shared.rollout import Rollout

CFG = dict(hidden_size=32, num_layers=1, num_heads=2, sft_size=10, train_size=50, val_size=10, eval_size=10)
# Prompts of different lengths, so that the batch is left-padded.
ROWS = [{"prompt": "1+2="}, {"prompt": "347+582="}, {"prompt": "12+9="}]
N_PER_PROMPT = 4
ATOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return build_model(ArithmeticTaskConfig(**CFG), tok)


def _policy(tok, model=None, temperature=1.0, **kw):
    return CausalLMPolicy(model if model is not None else _model(tok), tok, temperature=temperature,
                          max_new_tokens=5, **kw)


def _sample(policy, rows=ROWS, n=N_PER_PROMPT, seed=0, first_sample_id=0):
    return policy.sample(rows, n, seed=seed, first_sample_id=first_sample_id, first_group_id=0)


def _plain_log_probs(model, input_ids, attention_mask, mask, temperature=1.0, with_entropy=False):
    """Full-vocabulary twin of LMForward: logits of the whole sequence, log_softmax, gather."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    T = mask.shape[1]
    logp_all = torch.log_softmax(logits[:, -T - 1 : -1].float() / temperature, -1)
    lp = logp_all.gather(-1, input_ids[:, -T:].unsqueeze(-1)).squeeze(-1) * mask
    if not with_entropy:
        return lp
    ent = -(logp_all.exp() * logp_all).sum(-1) * mask
    return lp, ent


def _tokens(rollout: Rollout, i: int) -> list[int]:
    T = rollout.mask.shape[1]
    comp = rollout.inputs["input_ids"][i, -T:]
    return comp[rollout.mask[i].bool()].tolist()


# ---------------------------------------------------------------- log-probs vs plain computation


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_match_full_logits(tok, temperature):
    policy = _policy(tok, temperature=temperature)
    r = _sample(policy)
    assert r.mask.sum() > 0
    with torch.no_grad():
        lp, ent = policy.log_probs(r, with_entropy=True)
        ref_lp, ref_ent = _plain_log_probs(policy.module.model, r.inputs["input_ids"], r.inputs["attention_mask"],
                                           r.mask, temperature, with_entropy=True)
    assert lp.shape == r.mask.shape and lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref_lp, atol=ATOL, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=ATOL, rtol=0)
    assert (lp[r.mask == 0] == 0).all() and (ent[r.mask == 0] == 0).all()
    assert (lp[r.mask == 1] < 0).all()


def test_log_probs_chunk_size_invariant(tok):
    model = _model(tok)
    r = _sample(_policy(tok, model))
    with torch.no_grad():
        a = _policy(tok, model, temperature=0.7, chunk_size=1024).log_probs(r)[0]
        b = _policy(tok, model, temperature=0.7, chunk_size=3).log_probs(r)[0]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_log_probs_gradients_match_full_logits(tok):
    policy = _policy(tok, temperature=0.7, chunk_size=4)
    model = policy.module.model
    r = _sample(policy)
    coef = torch.randn(r.mask.shape, generator=torch.Generator().manual_seed(0))

    def grads(lp):
        model.zero_grad(set_to_none=True)
        (lp * coef).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got = grads(policy.log_probs(r)[0])
    ref = grads(_plain_log_probs(model, r.inputs["input_ids"], r.inputs["attention_mask"], r.mask, 0.7))
    assert got.keys() == ref.keys() and len(got) > 0
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=ATOL, rtol=1e-4, msg=n)


def test_greedy_log_probs_match_generate_scores(tok):
    """Position ids under left padding must match those `generate` uses, or these disagree."""
    policy = _policy(tok)
    model = policy.module.model
    prompts = [r["prompt"] for r in ROWS]
    inputs, mask, texts, _ = policy.generate(ROWS, n=1, seed=None)
    r = Rollout(inputs=inputs, mask=mask, group_ids=torch.arange(len(prompts)))

    enc = policy.encode_prompts(prompts, "cpu")
    assert (enc["attention_mask"] == 0).any()  # left padding is exercised
    Lp = enc["input_ids"].shape[1]
    cfg = GenerationConfig(do_sample=False, max_new_tokens=5, eos_token_id=policy.eos_ids, pad_token_id=policy.pad_id)
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc, generation_config=cfg, output_scores=True, output_logits=True,
                             return_dict_in_generate=True)
    gen = out.sequences[:, Lp:]
    T = mask.shape[1]
    assert gen.shape[1] == T == len(out.scores)
    # Same greedy tokens (policy pads after EOS; generate does too).
    assert torch.equal(gen.masked_fill(mask == 0, policy.pad_id), inputs["input_ids"][:, Lp:])

    for steps in (out.scores, out.logits):
        logp_gen = torch.stack([torch.log_softmax(s.float(), -1) for s in steps], 1)  # [B, T, V]
        logp_gen = logp_gen.gather(-1, gen.unsqueeze(-1)).squeeze(-1) * mask
        with torch.no_grad():
            lp = policy.log_probs(r)[0]
        torch.testing.assert_close(lp, logp_gen, atol=ATOL, rtol=0)
    # Greedy tokens are the argmax of each step's scores.
    for t, s in enumerate(out.scores):
        live = mask[:, t].bool()
        assert torch.equal(s.argmax(-1)[live], gen[live, t])


def test_sampled_log_probs_batch_vs_alone(tok):
    """Log-probs of one row do not depend on the left padding its batch imposes."""
    policy = _policy(tok)
    r = _sample(policy)
    n = N_PER_PROMPT
    b_rows = list(range(n, 2 * n))
    with torch.no_grad():
        lp_batch = policy.log_probs(r)[0][b_rows]
        alone = r.select(b_rows)
        # Strip the padding columns the other prompts forced on this prompt.
        keep = alone.inputs["attention_mask"][:, : -alone.mask.shape[1]].any(0)
        Lp = int(keep.sum())
        ids = torch.cat([alone.inputs["input_ids"][:, : -alone.mask.shape[1]][:, keep],
                         alone.inputs["input_ids"][:, -alone.mask.shape[1]:]], 1)
        am = torch.cat([torch.ones(len(b_rows), Lp, dtype=torch.long), alone.mask], 1)
        lp_alone = policy.log_probs(Rollout(inputs={"input_ids": ids, "attention_mask": am}, mask=alone.mask,
                                            group_ids=alone.group_ids))[0]
    torch.testing.assert_close(lp_batch, lp_alone, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- sampling reproducibility


def test_sampling_batch_invariant(tok):
    policy = _policy(tok)
    n = N_PER_PROMPT
    full = _sample(policy, ROWS, n, seed=7, first_sample_id=0)
    alone = _sample(policy, [ROWS[1]], n, seed=7, first_sample_id=n)
    assert full.completions[n : 2 * n] == alone.completions
    for j in range(n):
        assert _tokens(full, n + j) == _tokens(alone, j)
    # And the other way round: the last prompt alone, with its global ids.
    last = _sample(policy, [ROWS[2]], n, seed=7, first_sample_id=2 * n)
    assert full.completions[2 * n :] == last.completions
    # With wrong ids the samples are (almost surely) different.
    wrong = _sample(policy, [ROWS[1]], n, seed=7, first_sample_id=0)
    assert wrong.completions != alone.completions


def test_sampling_same_seed_reproducible_different_seed_differs(tok):
    policy = _policy(tok)
    a = _sample(policy, seed=3)
    b = _sample(policy, seed=3)
    assert a.completions == b.completions
    for k in a.inputs:
        assert torch.equal(a.inputs[k], b.inputs[k])
    assert torch.equal(a.mask, b.mask)
    c = _sample(policy, seed=4)
    assert a.completions != c.completions


def test_sampling_top_k_one_is_greedy(tok):
    model = _model(tok)
    greedy = _policy(tok, model).complete(ROWS)
    sampled = _sample(_policy(tok, model, top_k=1), n=2, seed=11)
    assert sampled.completions == [c for c in greedy for _ in range(2)]


def test_sample_rollout_fields(tok):
    policy = _policy(tok)
    r = _sample(policy)
    B = len(ROWS) * N_PER_PROMPT
    assert len(r) == B
    assert r.group_ids.tolist() == [g for g in range(len(ROWS)) for _ in range(N_PER_PROMPT)]
    assert [row["prompt"] for row in r.rows] == [row["prompt"] for row in ROWS for _ in range(N_PER_PROMPT)]
    assert [row["completion_length"] for row in r.rows] == r.mask.sum(-1).tolist()
    T = r.mask.shape[1]
    assert T <= 5
    assert torch.equal(r.inputs["attention_mask"][:, -T:], r.mask)
    assert r.stats["sample_tokens"] == float(r.mask.sum())
    # Prompt part is the left-padded prompt encoding.
    enc = policy.encode_prompts([row["prompt"] for row in ROWS], "cpu")
    assert torch.equal(r.inputs["input_ids"][:, :-T], enc["input_ids"].repeat_interleave(N_PER_PROMPT, 0))
    assert torch.equal(r.inputs["attention_mask"][:, :-T], enc["attention_mask"].repeat_interleave(N_PER_PROMPT, 0))


# ---------------------------------------------------------------- masks


def test_completion_mask_hand_built():
    ids = torch.tensor([[5, 1, 6, 1], [5, 6, 7, 8], [1, 0, 0, 0], [0, 0, 0, 1]])
    assert completion_mask(ids, [1]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    # Several EOS ids: the first of any of them ends the completion.
    ids = torch.tensor([[5, 9, 1, 6], [5, 6, 1, 9], [7, 7, 7, 7]])
    assert completion_mask(ids, [1, 9]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert completion_mask(ids, [1, 9]).dtype == torch.long


def test_sampled_tokens_after_eos_masked_and_padded(tok):
    policy = _policy(tok)
    r = _sample(policy, seed=0)
    T = r.mask.shape[1]
    comp = r.inputs["input_ids"][:, -T:]
    eos = policy.eos_ids[0]
    is_eos = comp == eos
    # The test must exercise early EOS: some row ends before the last column.
    early = is_eos[:, :-1].any(-1)
    assert early.any()
    assert torch.equal(r.mask, completion_mask(comp, policy.eos_ids))
    assert (comp[r.mask == 0] == policy.pad_id).all()
    assert (is_eos.sum(-1) <= 1).all()  # at most one EOS survives
    for i in range(len(r)):
        m = r.mask[i].tolist()
        L = sum(m)
        assert m == [1] * L + [0] * (T - L)  # prefix mask
        if is_eos[i].any():
            assert comp[i, L - 1] == eos  # the EOS itself is trained
    assert r.stats["truncated_frac"] == pytest.approx(1.0 - is_eos.any(-1).float().mean().item())


def test_demo_batch(tok):
    policy = _policy(tok)
    rows = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "347+582=", "completion": "929"},
            {"prompt": "5+55=", "completion": "60"}]
    r = policy.demo_batch(rows)
    eos, pad = policy.eos_ids[0], policy.pad_id
    T = r.mask.shape[1]
    assert T == 4  # longest completion (3 chars) + EOS
    assert r.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    comp = r.inputs["input_ids"][:, -T:]
    for i, row in enumerate(rows):
        c = tok(row["completion"], add_special_tokens=False)["input_ids"]
        L = len(c) + 1
        assert comp[i, :L].tolist() == c + [eos]
        assert (comp[i, L:] == pad).all()
    assert torch.equal(r.inputs["attention_mask"][:, -T:], r.mask)
    # Prompt tokens (including the left padding) are never trained.
    enc = policy.encode_prompts([row["prompt"] for row in rows], "cpu")
    assert torch.equal(r.inputs["input_ids"][:, :-T], enc["input_ids"])
    assert r.group_ids.tolist() == [0, 1, 2]
    # the rows, plus each completion's token length (for length-shaped rewards of offline completions)
    assert [{k: v for k, v in x.items() if k != "completion_length"} for x in r.rows] == rows
    assert [x["completion_length"] for x in r.rows] == r.mask.sum(-1).tolist()
    with torch.no_grad():
        lp = policy.log_probs(r)[0]
        ref = _plain_log_probs(policy.module.model, r.inputs["input_ids"], r.inputs["attention_mask"], r.mask)
    torch.testing.assert_close(lp, ref, atol=ATOL, rtol=0)
    assert (lp[r.mask == 0] == 0).all() and (lp[r.mask == 1] < 0).all()


# ---------------------------------------------------------------- references


def test_lora_reference_is_base_with_adapter_disabled(tok):
    peft = pytest.importorskip("peft")
    model = _model(tok)
    base_policy = _policy(tok, model)
    r = _sample(base_policy)
    with torch.no_grad():
        base_lp = base_policy.log_probs(r)[0]

    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      task_type="CAUSAL_LM"))
    policy = _policy(tok, lora)
    with torch.no_grad():
        # LoRA B initialises to zero: the adapter is a no-op until trained.
        torch.testing.assert_close(policy.log_probs(r)[0], base_lp, atol=ATOL, rtol=0)
        g = torch.Generator().manual_seed(1)
        n_b = 0
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                n_b += 1
        assert n_b == 2  # q_proj and v_proj of the single layer
        lp = policy.log_probs(r)[0]
        ref = policy.reference_log_probs(r)
    assert (lp - base_lp).abs().max() > 1e-3  # adapter on changes outputs
    torch.testing.assert_close(ref, base_lp, atol=ATOL, rtol=0)  # adapter off is the base
    # The adapter is re-enabled after the reference pass.
    with torch.no_grad():
        torch.testing.assert_close(policy.log_probs(r)[0], lp, atol=0, rtol=0)

    policy.build_reference()  # no-op: no copy is made
    assert policy._reference is None
    with torch.no_grad():
        torch.testing.assert_close(policy.reference_log_probs(r), base_lp, atol=ATOL, rtol=0)

    trainable = policy.trainable_parameters()
    names = {n for n, p in policy.module.named_parameters() if p.requires_grad}
    assert len(trainable) == len(names) == 4 and all("lora_" in n for n in names)
    # Gradients reach only the adapter.
    policy.log_probs(r)[0].sum().backward()
    assert all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in policy.module.parameters() if not p.requires_grad)


def test_full_weight_reference_snapshots_weights(tok):
    policy = _policy(tok)
    r = _sample(policy)
    with pytest.raises(RuntimeError):
        policy.reference_log_probs(r)
    with torch.no_grad():
        lp0 = policy.log_probs(r)[0]
    policy.build_reference()
    assert policy._reference is not None
    assert not any(p.requires_grad for p in policy._reference.parameters())
    assert all(p.requires_grad for p in policy.module.parameters())  # the trained copy is untouched
    with torch.no_grad():
        torch.testing.assert_close(policy.reference_log_probs(r), lp0, atol=0, rtol=0)
        model = policy.module.model
        model.model.layers[0].self_attn.q_proj.weight.add_(0.5)
        model.model.embed_tokens.weight.mul_(1.5)  # tied with the LM head
        lp1 = policy.log_probs(r)[0]
        ref = policy.reference_log_probs(r)
    assert (lp1 - lp0).abs().max() > 1e-3
    torch.testing.assert_close(ref, lp0, atol=0, rtol=0)
    # The reference's tied head still shares storage with its own embedding, not the live model's.
    ref_model = policy._reference.model
    assert ref_model.lm_head.weight.data_ptr() == ref_model.model.embed_tokens.weight.data_ptr()
    assert ref_model.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()


# ---------------------------------------------------------------- save / load


def test_save_pretrained_round_trip(tok, tmp_path):
    policy = _policy(tok, temperature=0.7)
    with torch.no_grad():
        # Move off the init so a silently re-initialised load would show.
        policy.module.model.model.layers[0].mlp.up_proj.weight.add_(0.1)
    r = _sample(policy)
    with torch.no_grad():
        lp = policy.log_probs(r)[0]
    policy.save_pretrained(tmp_path)

    loaded = Qwen2ForCausalLM.from_pretrained(tmp_path)
    tok2 = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert tok2.pad_token_id == tok.pad_token_id and tok2.eos_token_id == tok.eos_token_id
    assert tok2("347+582=", add_special_tokens=False)["input_ids"] == tok("347+582=", add_special_tokens=False)["input_ids"]
    sd0, sd1 = policy.module.model.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k

    policy2 = _policy(tok2, loaded, temperature=0.7)
    with torch.no_grad():
        lp2 = policy2.log_probs(r)[0]
    torch.testing.assert_close(lp2, lp, atol=1e-6, rtol=0)
    r2 = _sample(policy2)
    assert r2.completions == r.completions
    assert torch.equal(r2.inputs["input_ids"], r.inputs["input_ids"])


def test_sft_step_fits_the_untempered_distribution(tok):
    """The warm-up's NLL is taken at temperature 1 whatever the RL sampling temperature, so the same
    demonstrations give the same loss and the same update for a policy sampling at 1.0 and at 2.0."""
    from shared.sft import sft_step

    demos = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "12+9=", "completion": "21"}]
    losses, weights = [], []
    for temperature in (1.0, 2.0):
        policy = _policy(tok, _model(tok), temperature=temperature)
        params = policy.trainable_parameters()
        opt = torch.optim.SGD(params, lr=0.1)
        losses.append(sft_step(policy, demos, params, opt))
        weights.append([p.detach().clone() for p in params])
        assert policy.module.temperature == temperature  # restored after the step
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # and the loss is the plain NLL of the demonstrations under the model (temperature 1)
    policy = _policy(tok, _model(tok), temperature=2.0)
    batch = policy.demo_batch(demos)
    logits = policy.module.model(**batch.inputs).logits[:, -batch.mask.shape[1] - 1 : -1].float()
    nll = -torch.log_softmax(logits, -1).gather(-1, batch.inputs["input_ids"][:, -batch.mask.shape[1]:, None])[..., 0]
    torch.testing.assert_close(losses[0], (nll * batch.mask).sum() / batch.mask.sum(), atol=1e-5, rtol=0)


def test_checkpoint_generation_config_does_not_change_rollouts():
    """generate fills unset fields from the model's generation_config.json; a repetition penalty there
    would make the rollout sample from a distribution that log_probs does not score."""
    from llm_rl.policy import CausalLMPolicy
    from llm_rl.tasks.arithmetic import ArithmeticTaskConfig, build_model, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(ArithmeticTaskConfig(hidden_size=32, num_layers=1, num_heads=2), tok)
    rows = [{"prompt": "12+34="}, {"prompt": "7+5="}]
    policy = CausalLMPolicy(model, tok, max_new_tokens=6)
    clean = policy.generate(rows, n=3, seed=1)[2], policy.complete(rows)
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.min_new_tokens = 5
    assert (policy.generate(rows, n=3, seed=1)[2], policy.complete(rows)) == clean
