"""Token-level JS and cross-sampling (shared/analysis/divergence.py, METHODS.md B.17), TuCo
(shared/analysis/tuco.py, B.18) and text diversity (shared/analysis/diversity.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from llm_rl.policy import CausalLMPolicy
from llm_rl.tasks.arithmetic import ArithmeticTaskConfig, build_model, build_tokenizer
from shared.analysis.divergence import (
    cross_sample,
    js_divergence,
    js_profile,
    token_js,
    top_js_positions,
)
from shared.analysis.diversity import distinct_n, diversity_report, self_similarity
from shared.analysis.tuco import decompose, tuco, tuco_batch

CFG = ArithmeticTaskConfig(digits=2, hidden_size=32, num_layers=2, num_heads=2, sft_size=10, train_size=20,
                           val_size=8, eval_size=8)
PROMPTS = ["12+34=", "7+5=", "99+1="]


def _model(seed: int, tok):
    torch.manual_seed(seed)
    return build_model(CFG, tok).eval()


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    return _model(0, tok), _model(1, tok)


@pytest.fixture(scope="module")
def rollout(tok, models):
    """A teacher-forced batch ([left-padded prompt | completion + EOS], mask) with variable lengths."""
    policy = CausalLMPolicy(models[0], tok)
    return policy.rollout_from([{"prompt": p} for p in PROMPTS], [["46", "4 6 1"], ["12"], ["100", "7"]], 0)


def _log(p):
    return torch.tensor(p, dtype=torch.float64).log()


# ------------------------------------------------------------------ js_divergence
def test_js_identical_is_zero():
    logp = torch.randn(5, 7, dtype=torch.float64).log_softmax(-1)
    assert torch.allclose(js_divergence(logp, logp), torch.zeros(5, dtype=torch.float64), atol=1e-12)


def test_js_disjoint_one_hots_is_ln2():
    p, q = _log([1.0, 0.0, 0.0]), _log([0.0, 0.0, 1.0])
    assert float(js_divergence(p, q)) == pytest.approx(math.log(2), abs=1e-12)


def test_js_hand_case_and_symmetry():
    p, q = _log([0.5, 0.5]), _log([1.0, 0.0])
    # m = (0.75, 0.25); KL(p||m) = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25); KL(q||m) = 1 ln(1/0.75) + 0 ln 0
    expected = 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) + 0.5 * (1.0 * math.log(1 / 0.75))
    assert float(js_divergence(p, q)) == pytest.approx(expected, abs=1e-12)
    assert float(js_divergence(q, p)) == pytest.approx(expected, abs=1e-12)
    a = torch.randn(4, 9, dtype=torch.float64).log_softmax(-1)
    b = torch.randn(4, 9, dtype=torch.float64).log_softmax(-1)
    assert torch.allclose(js_divergence(a, b), js_divergence(b, a), atol=1e-14)
    assert (js_divergence(a, b) > 0).all() and (js_divergence(a, b) <= math.log(2)).all()


# ------------------------------------------------------------------ token_js
def test_token_js_same_model_is_zero(models, rollout):
    js = token_js(models[0], models[0], rollout.inputs["input_ids"], rollout.inputs["attention_mask"], rollout.mask)
    assert js.shape == rollout.mask.shape
    assert js.abs().max() < 1e-6


def _reference_token_js(model_a, model_b, input_ids, attention_mask, mask):
    """Plain twin: full logits from model(...).logits, probabilities in float64, a loop over positions."""
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    T = mask.shape[1]
    with torch.no_grad():
        la = model_a(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits[:, -T - 1 : -1]
        lb = model_b(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits[:, -T - 1 : -1]
    pa, pb = la.double().softmax(-1), lb.double().softmax(-1)
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for i in range(mask.shape[0]):
        for t in range(T):
            if mask[i, t]:
                p, q = pa[i, t], pb[i, t]
                m = (p + q) / 2
                out[i, t] = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    return out


def test_token_js_two_models_matches_full_logits(models, rollout):
    ids, attn, mask = rollout.inputs["input_ids"], rollout.inputs["attention_mask"], rollout.mask
    assert (mask == 0).any() and (attn == 0).any()  # variable completion lengths and left padding are exercised
    js = token_js(models[0], models[1], ids, attn, mask, chunk_size=3)
    assert (js[mask.bool()] > 0).all()
    assert (js[~mask.bool()] == 0).all()
    ref = _reference_token_js(models[0], models[1], ids, attn, mask)
    assert torch.allclose(js.double(), ref, atol=1e-5)


# ------------------------------------------------------------------ js_profile
def test_js_profile_known_top_positions():
    # 2 rows x 10 positions, all masked (n = 20): 0.01 everywhere, except 1.0 at the first position of
    # row 0 and the last position of row 1.
    js = torch.full((2, 10), 0.01)
    js[0, 0], js[1, 9] = 1.0, 1.0
    mask = torch.ones(2, 10)
    prof = js_profile(js, mask, n_bins=5, top_frac=0.1)  # k = ceil(0.1 * 20) = 2 top positions
    total = 18 * 0.01 + 2.0
    assert prof["mean"] == pytest.approx(total / 20)
    assert prof["top_positions_share"] == pytest.approx(2.0 / total)
    # 0.9-quantile of 18 x 0.01 and 2 x 1.0 (sorted index 0.9 * 19 = 17.1): 0.01 + 0.1 * (1.0 - 0.01)
    assert prof["threshold"] == pytest.approx(0.01 + 0.1 * 0.99, rel=1e-5)
    assert prof["frac_above"] == pytest.approx(2 / 20)
    # bins of t / 10: {0, 1}, {2, 3}, ..., {8, 9}; each bin holds 4 positions
    assert prof["relative_position_counts"] == [4] * 5
    assert prof["relative_position_hist"] == pytest.approx([(1.0 + 0.03) / 4, 0.01, 0.01, 0.01, (1.0 + 0.03) / 4])


def test_js_profile_relative_position_respects_lengths():
    # row 0 has 2 masked tokens (t/len = 0, 0.5), row 1 has 4 (0, .25, .5, .75); padding is ignored
    js = torch.tensor([[1.0, 2.0, 9.0, 9.0], [3.0, 4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    prof = js_profile(js, mask, n_bins=2, top_frac=0.5)
    assert prof["relative_position_counts"] == [3, 3]
    assert prof["relative_position_hist"] == pytest.approx([(1 + 3 + 4) / 3, (2 + 5 + 6) / 3])
    assert prof["mean"] == pytest.approx(21 / 6)
    assert prof["top_positions_share"] == pytest.approx((6 + 5 + 4) / 21)
    assert js_profile(js, torch.zeros_like(mask))["mean"] == 0.0


def test_top_js_positions_per_row():
    js = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.3, 0.2, 0.1, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    top = top_js_positions(js, mask, top_frac=0.5)  # ceil(1.5) = 2 and ceil(2) = 2 per row; padded 0.9 ignored
    assert top.tolist() == [[False, True, True, False], [True, True, False, False]]


# ------------------------------------------------------------------ cross_sample
def _greedy(policy, tok, max_new_tokens):
    return policy.generate([{"prompt": p} for p in PROMPTS], n=1, seed=None, max_new_tokens=max_new_tokens)[2]


def test_cross_sample_without_switch_is_greedy(tok, models):
    policy = CausalLMPolicy(models[0], tok, max_new_tokens=5)
    enc = policy.encode_prompts(PROMPTS, "cpu")
    greedy = _greedy(policy, tok, 5)
    assert cross_sample(models[0], models[1], tok, enc["input_ids"], enc["attention_mask"], None, 5) == greedy
    every = torch.ones(len(PROMPTS), 5, dtype=torch.bool)
    assert cross_sample(models[0], models[0], tok, enc["input_ids"], enc["attention_mask"], every, 5) == greedy


def test_cross_sample_switching_everywhere_is_model_b_greedy(tok, models):
    enc = CausalLMPolicy(models[0], tok).encode_prompts(PROMPTS, "cpu")
    greedy_b = _greedy(CausalLMPolicy(models[1], tok), tok, 5)
    steps = torch.arange(5)  # 1-D positions, applied to every row
    assert cross_sample(models[0], models[1], tok, enc["input_ids"], enc["attention_mask"], steps, 5) == greedy_b


# ------------------------------------------------------------------ TuCo
def _prompt_ids(tok, text="12+34=7"):
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _perturbed(model, layer=1, scale=0.2):
    tuned = copy.deepcopy(model)
    w = tuned.model.layers[layer].mlp.down_proj.weight
    with torch.no_grad():
        w.add_(scale * torch.randn(w.shape, generator=torch.Generator().manual_seed(7)))
    return tuned


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tuco_rerun_reproduces_final_hidden(tok, attn):
    model = _model(0, tok)
    model.set_attn_implementation(attn)
    ids = _prompt_ids(tok)
    captured = {}
    hook = model.model.layers[-1].register_forward_hook(lambda m, a, out: captured.update(x=out))  # returns None
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    hook.remove()
    x_L = decompose(model, model, ids)["final_hidden"]
    assert torch.allclose(x_L, captured["x"], atol=1e-4)  # last block's output, before the final norm
    # transformers 5: hidden_states[-1] is the *normed* last hidden state, hence the hook above
    assert torch.allclose(model.model.norm(x_L), out.hidden_states[-1], atol=1e-4)


def test_tuco_identical_models_is_zero(tok, models):
    r = tuco(models[0], models[0], _prompt_ids(tok))
    assert r["tuco"] == 0.0 and r["norm_ft"] == 0.0 and r["norm_pt"] > 0
    assert r["per_layer_ft_norm"] == [0.0] * CFG.num_layers


def _hooked_reference_tuco(base, tuned, ids):
    """Twin through the models' own forward: hooks record the fine-tuned layers' inputs x_l and outputs,
    and feed x_l into the base layers in place of the base trajectory."""
    xs, ft_out, pt_out = [], [], []
    def record_ft(module, args, out):
        xs.append(args[0])
        ft_out.append(out)

    def record_pt(module, args, out):
        pt_out.append(out)

    hooks = [layer.register_forward_hook(record_ft) for layer in tuned.model.layers]
    with torch.no_grad():
        tuned(ids)
    for h in hooks:
        h.remove()
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: (xs[i],) + tuple(a[1:]))  # replaces the input
             for i, layer in enumerate(base.model.layers)]
    hooks += [layer.register_forward_hook(record_pt) for layer in base.model.layers]
    with torch.no_grad():
        base(ids)
    for h in hooks:
        h.remove()
    i_pt = sum(p[0, -1] - x[0, -1] for p, x in zip(pt_out, xs))
    i_ft = sum(f[0, -1] - p[0, -1] for f, p in zip(ft_out, pt_out))
    return float(i_ft.norm() / (i_pt.norm() + i_ft.norm()))


def test_tuco_perturbed_layer_in_unit_interval_and_matches_hooks(tok, models):
    base = models[0]
    tuned = _perturbed(base, layer=1)
    ids = _prompt_ids(tok)
    r = tuco(base, tuned, ids)
    assert 0 < r["tuco"] < 1
    assert r["per_layer_ft_norm"][0] == 0.0 and r["per_layer_ft_norm"][1] > 0  # layer 0 is unchanged
    assert r["tuco"] == pytest.approx(_hooked_reference_tuco(base, tuned, ids), abs=1e-5)
    batch = tuco_batch(base, tuned, [ids, _prompt_ids(tok, "7+5=")[0]])
    assert batch["per_prompt"][0] == pytest.approx(r["tuco"])
    assert batch["tuco"] == pytest.approx(sum(batch["per_prompt"]) / 2)


def test_tuco_rejects_batches(tok, models):
    with pytest.raises(ValueError, match="one unpadded prompt"):
        tuco(models[0], models[1], torch.zeros(2, 3, dtype=torch.long))


# ------------------------------------------------------------------ diversity
def test_distinct_n_hand_cases():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    # pooled over the set: unigrams a b | a c -> {a, b, c} / 4
    assert distinct_n(["a b", "a c"], 1) == pytest.approx(3 / 4)
    assert distinct_n(["a", ""], 2) == 0.0
    assert distinct_n(["ab"], 1, tokenize=list) == 1.0


def test_self_similarity_hand_cases():
    # bigram sets: {ab, bc}, {ab, bd}, {xy}: J = 1/3, 0, 0 -> mean 1/9
    assert self_similarity(["a b c", "a b d", "x y"], n=2) == pytest.approx(1 / 9)
    assert self_similarity(["a b c", "a b c"]) == 1.0
    assert self_similarity(["a b c"]) == 0.0
    rep = diversity_report(["a b a b", "a b"])
    assert rep == pytest.approx({"distinct_1": 2 / 6, "distinct_2": 2 / 4, "self_similarity": 1 / 2, "mean_length": 3.0})
