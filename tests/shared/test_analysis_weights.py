"""Weight-space metrics (shared/analysis/weights.py, METHODS.md B.20) and LIFT (shared/analysis/lift.py, B.19)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from llm_rl.tasks.arithmetic import ArithmeticTaskConfig, build_model, build_tokenizer
from shared.analysis.lift import MaskedAdamW, lift_mask, lift_masks
from shared.analysis.weights import (
    compare_state_dicts,
    principal_angles,
    principal_mask,
    spectral_drift,
    update_alignment,
)


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _rank_k_reference(w: torch.Tensor, k: int) -> torch.Tensor:
    """Plain sum of the k leading rank-1 terms s_i u_i v_iᵀ."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    out = torch.zeros_like(w, dtype=torch.float64)
    for i in range(k):
        out += s[i] * torch.outer(u[:, i], vh[i])
    return out


def _assert_top_entries(mask: torch.Tensor, scores: torch.Tensor, n: int) -> None:
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert int(mask.sum()) == n
    if n < mask.numel():
        assert scores[mask].min() >= scores[~mask].max()


# ---------------------------------------------------------------- identical matrices


def test_identical_matrices_give_zero_everywhere():
    w = _rand(6, 4)
    assert spectral_drift(w, w.clone()) == 0.0
    assert spectral_drift(w, w.clone(), k=2) == 0.0
    angles = principal_angles(w, w.clone(), k=3)
    for key, value in angles.items():
        assert value == pytest.approx(0.0, abs=1e-6), key
    align = update_alignment(w, w.clone(), k=2, frac=0.25)
    assert align == {"overlap": 0.0, "chance": 0.25, "energy_fraction": 0.0, "update_frac": 0.0}


# ---------------------------------------------------------------- spectral drift


def test_spectral_drift_known_spectrum_change():
    # W0 = diag(3, 2, 1), W1 = diag(3, 2, 2), padded with a zero row to 4x3.
    # σ(W1) − σ(W0) = (0, 0, 1);  ‖σ(W0)‖ = sqrt(9 + 4 + 1) = sqrt(14)  ->  drift = 1/sqrt(14)
    w0 = torch.zeros(4, 3, dtype=torch.float64)
    w1 = torch.zeros(4, 3, dtype=torch.float64)
    w0[:3, :3] = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    w1[:3, :3] = torch.diag(torch.tensor([3.0, 2.0, 2.0], dtype=torch.float64))
    assert spectral_drift(w0, w1) == pytest.approx(1 / math.sqrt(14), abs=1e-12)
    assert spectral_drift(w0, w1, k=3) == pytest.approx(1 / math.sqrt(14), abs=1e-12)
    # top-2 values (3, 2) are unchanged
    assert spectral_drift(w0, w1, k=2) == pytest.approx(0.0, abs=1e-12)
    # ordering is by magnitude: diag(1, 2, 3) has the same spectrum as diag(3, 2, 1)
    assert spectral_drift(w0, torch.flip(w0, dims=(0, 1))) == pytest.approx(0.0, abs=1e-12)


def test_spectral_drift_accepts_float32_and_bf16():
    w = _rand(5, 3, dtype=torch.float32)
    assert spectral_drift(w.bfloat16(), w.bfloat16()) == 0.0
    assert spectral_drift(w, 2 * w) == pytest.approx(1.0, abs=1e-6)  # σ doubles: ‖σ‖/‖σ‖ = 1


# ---------------------------------------------------------------- principal angles


def test_rotation_gives_known_left_angle_and_zero_right_angle():
    # W1 = R(30°) W0 with W0 = diag(5, 1): U1 = R U0 so the top left vector turns by 30°;
    # W1ᵀW1 = W0ᵀW0 so V (and σ) are unchanged.
    theta = math.radians(30.0)
    rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
    w0 = torch.diag(torch.tensor([5.0, 1.0], dtype=torch.float64))
    w1 = rot @ w0
    a = principal_angles(w0, w1, k=1)
    assert a["left_mean_deg"] == pytest.approx(30.0, abs=1e-6)
    assert a["left_max_deg"] == pytest.approx(30.0, abs=1e-6)
    assert a["left_sin_fro"] == pytest.approx(0.5, abs=1e-9)  # sin 30° = 1/2
    assert a["right_mean_deg"] == pytest.approx(0.0, abs=1e-6)
    assert a["right_max_deg"] == pytest.approx(0.0, abs=1e-6)
    assert a["right_sin_fro"] == pytest.approx(0.0, abs=1e-9)
    assert spectral_drift(w0, w1) == pytest.approx(0.0, abs=1e-12)
    # with k = 2 both subspaces are all of R^2: no angle
    assert principal_angles(w0, w1, k=2)["left_max_deg"] == pytest.approx(0.0, abs=1e-6)


def test_principal_angles_match_plain_acos_reference():
    w0, w1 = _rand(8, 6, seed=1), _rand(8, 6, seed=2)
    k = 3
    u0, _, vh0 = torch.linalg.svd(w0, full_matrices=False)
    u1, _, vh1 = torch.linalg.svd(w1, full_matrices=False)
    got = principal_angles(w0, w1, k)
    for side, q0, q1 in (("left", u0[:, :k], u1[:, :k]), ("right", vh0[:k].T, vh1[:k].T)):
        cos = [min(1.0, max(0.0, float(c))) for c in torch.linalg.svdvals(q0.T @ q1)]
        deg = [math.degrees(math.acos(c)) for c in cos]
        assert got[f"{side}_mean_deg"] == pytest.approx(sum(deg) / k, abs=1e-6)
        assert got[f"{side}_max_deg"] == pytest.approx(max(deg), abs=1e-6)
        assert got[f"{side}_sin_fro"] == pytest.approx(math.sqrt(sum(1 - c * c for c in cos)), abs=1e-9)


# ---------------------------------------------------------------- principal mask


@pytest.mark.parametrize("frac, n_expected", [(0.01, 1), (0.1, 4), (0.2, 7), (0.5, 18), (1.0, 35)])
def test_principal_mask_counts_and_picks_largest(frac, n_expected):
    # n = max(1, round(frac · 35)): 0.35 -> 0 -> 1; 3.5 -> 4; 7; 17.5 -> 18 (round half to even); 35
    w = _rand(7, 5, seed=3)
    mask = principal_mask(w, k=2, frac=frac)
    _assert_top_entries(mask, _rank_k_reference(w, 2).abs(), n_expected)


def test_principal_mask_uses_the_low_rank_approximation_not_w():
    # W = [[1, 1, 0], [1, 1, 0], [0, 0, 1.5]]: σ = (2, 1.5, 0) with the top pair u = v = (1, 1, 0)/√2,
    # so W_1 = [[1, 1, 0], [1, 1, 0], [0, 0, 0]]. The 4 top entries of |W_1| are the 2x2 block, which
    # leaves out W's largest entry 1.5 at (2, 2).
    w = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.5]], dtype=torch.float64)
    mask = principal_mask(w, k=1, frac=4 / 9)
    assert mask.tolist() == [[True, True, False], [True, True, False], [False, False, False]]


# ---------------------------------------------------------------- update alignment


def test_update_alignment_hand_counts_and_bf16_threshold():
    # W0 = [[1..4], ..., [13..16]] has rank 2, so W_2 = W0 and M_p (frac 1/4 -> 4 entries) is the
    # last row {13, 14, 15, 16}.
    w0 = torch.arange(1.0, 17.0, dtype=torch.float64).view(4, 4)
    w1 = w0.clone()
    w1[3, 3] += 1.0  # in M_p, far above 2^-8 · 16
    w1[0, 0] += 1.0  # not in M_p
    w1[1, 1] += 6.0 * 2.0**-10  # below bf16 resolution 2^-8 · 6: not an update by default
    a = update_alignment(w0, w1, k=2, frac=0.25)
    assert a["overlap"] == pytest.approx(1 / 2)
    assert a["update_frac"] == pytest.approx(2 / 16)
    assert a["chance"] == 0.25
    b = update_alignment(w0, w1, k=2, frac=0.25, threshold=0.0)  # every change counts
    assert b["overlap"] == pytest.approx(1 / 3)
    assert b["update_frac"] == pytest.approx(3 / 16)
    # W0 has rank 2, so its top-2 subspaces hold all of W0's row and column spaces; a change at
    # (0, 0) = e0 e0ᵀ is generally not inside them, hence energy < 1.
    assert 0.0 < a["energy_fraction"] < 1.0


def test_energy_fraction_of_known_low_rank_updates():
    w0 = _rand(6, 5, seed=4)
    u, _, vh = torch.linalg.svd(w0, full_matrices=False)
    on_top = 0.1 * torch.outer(u[:, 0], vh[0])  # along the top singular pair
    for k in (1, 2, 3):
        assert update_alignment(w0, w0 + on_top, k=k, frac=0.1)["energy_fraction"] == pytest.approx(1.0, abs=1e-9)
    k = 2
    off = 0.1 * torch.outer(u[:, k], vh[0])  # u ⟂ span(U_k): U_kᵀ ΔW = 0
    assert update_alignment(w0, w0 + off, k=k, frac=0.1)["energy_fraction"] == pytest.approx(0.0, abs=1e-12)
    off_right = 0.1 * torch.outer(u[:, 0], vh[k])  # v ⟂ span(V_k): ΔW V_k = 0 (both sides are projected)
    assert update_alignment(w0, w0 + off_right, k=k, frac=0.1)["energy_fraction"] == pytest.approx(0.0, abs=1e-12)
    # mixed, k = 1: ΔW = 3 u1 v1ᵀ + 4 u2 v1ᵀ;  ‖U_1ᵀ ΔW V_1‖² = 9, ‖ΔW‖² = 9 + 16  ->  9/25
    mixed = 3 * torch.outer(u[:, 0], vh[0]) + 4 * torch.outer(u[:, 1], vh[0])
    assert update_alignment(w0, w0 + mixed, k=1, frac=0.1)["energy_fraction"] == pytest.approx(0.36, abs=1e-9)


def test_bad_inputs_raise_value_error():
    w = _rand(4, 3)
    with pytest.raises(ValueError, match="same shape"):
        spectral_drift(w, _rand(3, 4))
    with pytest.raises(ValueError, match="2-D"):
        spectral_drift(w[0], w[0])
    with pytest.raises(ValueError, match="k must be"):
        principal_angles(w, w, k=4)
    with pytest.raises(ValueError, match="k must be"):
        principal_mask(w, k=0, frac=0.1)
    with pytest.raises(ValueError, match="frac"):
        principal_mask(w, k=1, frac=0.0)
    with pytest.raises(ValueError, match="threshold"):
        update_alignment(w, w, k=1, frac=0.1, threshold=-1.0)
    with pytest.raises(ValueError, match="W0 is zero"):
        spectral_drift(torch.zeros(3, 3), w[:3])


# ---------------------------------------------------------------- state dicts of a tiny Qwen2


def _tiny_qwen2_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    cfg = ArithmeticTaskConfig(digits=2, hidden_size=32, num_layers=1, num_heads=2, sft_size=10, train_size=20,
                               val_size=8, eval_size=8)
    model = build_model(cfg, build_tokenizer())
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def test_compare_state_dicts_on_tiny_qwen2():
    sd0 = _tiny_qwen2_state_dict()
    expected = {n for n, t in sd0.items() if t.dim() == 2 and min(t.shape) > 1 and "embed" not in n}
    assert len(expected) >= 7  # q, k, v, o, gate, up, down (+ lm_head when the dict lists it)

    same = compare_state_dicts(sd0, copy.deepcopy(sd0), k=4, frac=0.05)
    assert set(same["per_matrix"]) == expected and same["n_matrices"] == len(expected)
    for name, report in same["per_matrix"].items():
        for metric, value in report.items():
            assert value == pytest.approx(0.05 if metric == "chance" else 0.0, abs=1e-6), (name, metric)
    with_embed = compare_state_dicts(sd0, sd0, k=4, skip_embeddings=False)
    assert "model.embed_tokens.weight" in with_embed["per_matrix"]

    target = "model.layers.0.self_attn.q_proj.weight"
    sd1 = copy.deepcopy(sd0)
    g = torch.Generator().manual_seed(5)
    sd1[target] += torch.outer(torch.randn(32, generator=g), torch.randn(32, generator=g))  # rank-1 update
    diff = compare_state_dicts(sd0, sd1, k=4, frac=0.05)
    assert diff["n_matrices"] == len(expected)
    for name, report in diff["per_matrix"].items():
        if name == target:
            assert report["spectral_drift"] > 1e-3
            assert report["update_frac"] > 0.5
            assert report["energy_fraction"] > 0.0
            assert report["left_max_deg"] > 1e-3
        else:
            assert report["spectral_drift"] == 0.0 and report["update_frac"] == 0.0, name
            assert report["energy_fraction"] == 0.0 and report["left_max_deg"] < 1e-6, name
    n = diff["n_matrices"]
    assert diff["summary"]["spectral_drift"] == pytest.approx(diff["per_matrix"][target]["spectral_drift"] / n)


def test_compare_state_dicts_skips_non_matrices_mismatches_and_zero_starts():
    ids = torch.ones(3, 3, dtype=torch.long)
    sd0 = {"a": _rand(4, 3), "bias": _rand(4), "row": _rand(1, 5), "shape": _rand(3, 3), "ids": ids,
           "lora_B": torch.zeros(4, 2), "only0": _rand(3, 3)}
    sd1 = {"a": _rand(4, 3, seed=9), "bias": _rand(4), "row": _rand(1, 5), "shape": _rand(3, 4), "ids": ids,
           "lora_B": _rand(4, 2)}
    out = compare_state_dicts(sd0, sd1, k=16)  # k clipped to 3 for "a"
    assert list(out["per_matrix"]) == ["a"] and out["skipped_zero"] == ["lora_B"]
    assert out["summary"] == out["per_matrix"]["a"]


# ---------------------------------------------------------------- LIFT masks


def test_lift_mask_sizes_and_entries():
    params = {"w": _rand(6, 10, dtype=torch.float32), "small": _rand(3, 4, seed=1, dtype=torch.float32),
              "bias": _rand(10, dtype=torch.float32)}
    masks = lift_masks(params, filter_rank=2, lora_rank=2)
    assert set(masks) == {"w", "small"}  # non-2-D params train densely
    assert int(masks["small"].sum()) == 12  # (3 + 4) · 2 = 14 > 3 · 4 = 12: the full matrix
    # (6 + 10) · 2 = 32 of 60 entries, the largest of |W_2|
    _assert_top_entries(masks["w"], _rank_k_reference(params["w"], 2).abs(), 32)
    one = lift_mask(params["w"], filter_rank=100, lora_rank=1)  # filter rank clipped to 6
    _assert_top_entries(one, params["w"].double().abs(), 16)
    with pytest.raises(ValueError, match="2-D"):
        lift_mask(params["bias"], 2, 2)
    with pytest.raises(ValueError, match="lora_rank"):
        lift_masks(params, filter_rank=2, lora_rank=0)


# ---------------------------------------------------------------- MaskedAdamW


def _grads(shape, steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(steps)]


def test_masked_adamw_with_full_mask_equals_adamw():
    w0, b0 = _rand(5, 4, dtype=torch.float32), _rand(4, seed=1, dtype=torch.float32)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    w_ref, b_ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    hp = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    opt, ref = MaskedAdamW([w, b], **hp), torch.optim.AdamW([w_ref, b_ref], **hp)
    opt.set_masks({w: torch.ones(5, 4, dtype=torch.bool)})  # b has no mask: dense
    for gw, gb in zip(_grads((5, 4), 5, 2), _grads((4,), 5, 3)):
        w.grad, w_ref.grad, b.grad, b_ref.grad = gw.clone(), gw.clone(), gb.clone(), gb.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(w.data, w_ref.data, atol=1e-6, rtol=0)
        torch.testing.assert_close(b.data, b_ref.data, atol=1e-6, rtol=0)
    torch.testing.assert_close(opt.state[w]["exp_avg_sq"], ref.state[w_ref]["exp_avg_sq"], atol=1e-6, rtol=0)


def test_masked_adamw_touches_only_the_mask_and_follows_adamw_inside():
    w0 = _rand(6, 5, dtype=torch.float32)
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(7)) < 0.3
    w, w_ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    hp = {"lr": 0.05, "weight_decay": 0.1}
    opt, ref = MaskedAdamW([w], **hp), torch.optim.AdamW([w_ref], **hp)
    opt.set_masks({w: mask})
    for gw in _grads((6, 5), 5, 8):
        w.grad, w_ref.grad = gw.clone(), gw.clone()
        opt.step()
        ref.step()
        assert torch.equal(w.data[~mask], w0[~mask])  # bit-exact: no update, no decay outside M
        torch.testing.assert_close(w.data[mask], w_ref.data[mask], atol=1e-6, rtol=0)  # Adam is elementwise
    assert not torch.equal(w.data[mask], w0[mask])
    assert torch.equal(opt.state[w]["exp_avg"][~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(opt.state[w]["exp_avg_sq"][~mask], torch.zeros(int((~mask).sum())))


def test_refresh_moves_the_mask_and_zeroes_moments_that_left_it():
    w = torch.nn.Parameter(_rand(8, 6, dtype=torch.float32))
    opt = MaskedAdamW([w], lr=0.01, weight_decay=0.0)
    old = lift_mask(w.detach(), filter_rank=1, lora_rank=1)  # 14 of 48 entries
    opt.set_masks({w: old})
    for gw in _grads((8, 6), 3, 10):
        w.grad = gw
        opt.step()
    m_before = opt.state[w]["exp_avg"].clone()
    assert (m_before[old] != 0).all()
    with torch.no_grad():
        w.copy_(_rand(8, 6, seed=11, dtype=torch.float32))  # new weights -> a different principal mask
    opt.refresh(filter_rank=1, lora_rank=1)
    new = opt.masks[id(w)]
    assert torch.equal(new, lift_mask(w.detach(), 1, 1)) and not torch.equal(new, old)
    m_after, v_after = opt.state[w]["exp_avg"], opt.state[w]["exp_avg_sq"]
    assert (m_after[~new] == 0).all() and (v_after[~new] == 0).all()  # left the mask (or never in it)
    assert torch.equal(m_after[old & new], m_before[old & new])  # stayed: moments kept
    frozen = w.detach().clone()
    w.grad = torch.ones(8, 6)
    opt.step()
    assert torch.equal(w.data[~new], frozen[~new]) and (w.data[new] != frozen[new]).all()


def test_set_masks_rejects_bad_masks():
    w = torch.nn.Parameter(torch.zeros(3, 2))
    opt = MaskedAdamW([w])
    with pytest.raises(ValueError, match="bool"):
        opt.set_masks({w: torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not in this optimizer"):
        opt.set_masks({torch.nn.Parameter(torch.zeros(3, 2)): torch.ones(3, 2, dtype=torch.bool)})


def test_lift_optimizer_in_a_recipe_trains_only_principal_weights(tmp_path):
    """`optim.name: lift` in a run: 2-D weights change only inside their LIFT mask, 1-D ones densely."""
    from shared.analysis.lift import lift_mask
    from shared.config import validate_config
    from shared.loop import train
    from tests.helpers.tiny import tiny_config_dict

    import shared.loop as loop

    seen = {}
    real = loop.make_optimizer

    def spy(params, o):
        params = list(params)
        seen["before"] = [p.detach().clone() for p in params]
        seen["masks"] = [lift_mask(p.detach(), o.lift_filter_rank, o.lift_lora_rank) if p.dim() == 2 else None
                         for p in params]
        seen["params"] = params
        return real(params, o)

    loop.make_optimizer = spy
    try:
        train(validate_config(tiny_config_dict(tmp_path, optim={"name": "lift", "lift_filter_rank": 4, "lift_lora_rank": 1,
                                                                "lift_update_interval": 1000, "weight_decay": 0.0},
                                               train={"steps": 2}), "test"))
    finally:
        loop.make_optimizer = real
    changed_2d = 0
    for before, mask, p in zip(seen["before"], seen["masks"], seen["params"]):
        moved = p.detach() != before
        if mask is not None:
            assert not bool((moved & ~mask).any()), "an entry outside the LIFT mask changed"
            changed_2d += int(moved.any())
    assert changed_2d > 0
