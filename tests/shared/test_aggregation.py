"""Loss aggregation (shared/aggregation.py, METHODS.md A "Aggregation").

Hand values for each `loss_agg` mode, and the key property: with the GLOBAL StepNorm of the
optimizer step, summing per-micro-batch losses/gradients equals the full-batch loss/gradient for
every mode and micro-batch size (gradient accumulation is exact).
"""

from __future__ import annotations

import pytest
import torch

from shared.aggregation import LOSS_AGG_MODES, StepNorm, aggregate, masked_mean, token_weights
from shared.objectives import ppo_clip

from shared.config import AlgorithmConfig


def make_cfg(**kw):
    return AlgorithmConfig(**kw)


F64 = torch.float64

# [2, 3] example with a ragged mask
#   values = [[1, 2, 3],      mask = [[1, 1, 0],     |o_0| = 2, |o_1| = 3
#             [4, 5, 6]]              [1, 1, 1]]     5 tokens, 2 sequences
VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_step_norm_of():
    n = StepNorm.of(MASK, norm_len=4)
    assert (n.num_tokens, n.num_seqs, n.norm_len) == (5.0, 2.0, 4.0)
    # an all-zero row is not a sequence
    n = StepNorm.of(torch.tensor([[1, 0], [0, 0], [1, 1]]))
    assert (n.num_tokens, n.num_seqs, n.norm_len) == (3.0, 2.0, 1.0)


def test_token_mean_hand():
    # (1 + 2 + 4 + 5 + 6) / 5 = 18 / 5 = 3.6   (the masked 3 is ignored)
    out = aggregate(VALUES, MASK, "token_mean", StepNorm.of(MASK))
    assert out.item() == pytest.approx(3.6, rel=1e-7)


def test_seq_mean_token_mean_hand():
    # mean( (1+2)/2 , (4+5+6)/3 ) = mean(1.5, 5) = 3.25
    out = aggregate(VALUES, MASK, "seq_mean_token_mean", StepNorm.of(MASK))
    assert out.item() == pytest.approx(3.25, rel=1e-7)


def test_seq_mean_token_sum_hand():
    # mean( 1+2 , 4+5+6 ) = mean(3, 15) = 9
    out = aggregate(VALUES, MASK, "seq_mean_token_sum", StepNorm.of(MASK))
    assert out.item() == pytest.approx(9.0, rel=1e-7)


def test_seq_mean_token_sum_norm_hand():
    # mean(3, 15) / L_const:  L=3 -> 3.0 ;  L=4 -> 2.25 ; default L=1 -> 9
    assert aggregate(VALUES, MASK, "seq_mean_token_sum_norm", StepNorm.of(MASK, 3)).item() == pytest.approx(3.0)
    assert aggregate(VALUES, MASK, "seq_mean_token_sum_norm", StepNorm.of(MASK, 4)).item() == pytest.approx(2.25)
    assert aggregate(VALUES, MASK, "seq_mean_token_sum_norm", StepNorm.of(MASK)).item() == pytest.approx(9.0)


def test_token_weights_hand():
    n = StepNorm.of(MASK, 3)
    # token_mean: mask / 5
    torch.testing.assert_close(token_weights(MASK, "token_mean", n), torch.tensor([[0.2, 0.2, 0], [0.2, 0.2, 0.2]]))
    # seq_mean_token_mean: mask / (2 * |o_i|): row 0 -> 1/4, row 1 -> 1/6
    torch.testing.assert_close(
        token_weights(MASK, "seq_mean_token_mean", n), torch.tensor([[0.25, 0.25, 0], [1 / 6, 1 / 6, 1 / 6]])
    )
    # seq_mean_token_sum: mask / 2 ; _norm: mask / (2 * 3)
    torch.testing.assert_close(token_weights(MASK, "seq_mean_token_sum", n), torch.tensor([[0.5, 0.5, 0], [0.5] * 3]))
    torch.testing.assert_close(
        token_weights(MASK, "seq_mean_token_sum_norm", n), torch.tensor([[1 / 6, 1 / 6, 0], [1 / 6] * 3])
    )


def test_empty_rows_do_not_count_as_sequences():
    # rows: [1,2,_], [_,_,_] (empty), [4,5,6] -> num_seqs = 2
    values = torch.tensor([[1.0, 2.0, 3.0], [9.0, 9.0, 9.0], [4.0, 5.0, 6.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    n = StepNorm.of(mask)
    assert aggregate(values, mask, "seq_mean_token_mean", n).item() == pytest.approx(3.25)
    assert aggregate(values, mask, "seq_mean_token_sum", n).item() == pytest.approx(9.0)
    assert aggregate(values, mask, "token_mean", n).item() == pytest.approx(3.6)
    # an all-empty batch gives 0, not NaN
    z = torch.zeros(2, 3)
    for mode in LOSS_AGG_MODES:
        assert aggregate(values[:2], z, mode, StepNorm.of(z)).item() == 0.0


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="unknown loss_agg"):
        aggregate(VALUES, MASK, "sum", StepNorm.of(MASK))


def test_masked_mean():
    # (1 + 2 + 4 + 5 + 6)/5 = 3.6
    assert masked_mean(VALUES, MASK).item() == pytest.approx(3.6)
    assert masked_mean(VALUES, torch.zeros(2, 3)).item() == 0.0


def test_aggregate_loop_reference_random():
    gen = torch.Generator().manual_seed(11)
    B, T = 6, 5
    lengths = [5, 0, 2, 4, 1, 3]
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    values = torch.randn(B, T, generator=gen, dtype=F64)
    L = 7.0
    seqs = [[values[i, t].item() for t in range(T) if mask[i, t] > 0] for i in range(B)]
    seqs = [s for s in seqs if s]
    toks = [x for s in seqs for x in s]
    ref = {
        "token_mean": sum(toks) / len(toks),
        "seq_mean_token_mean": sum(sum(s) / len(s) for s in seqs) / len(seqs),
        "seq_mean_token_sum": sum(sum(s) for s in seqs) / len(seqs),
        "seq_mean_token_sum_norm": sum(sum(s) for s in seqs) / len(seqs) / L,
    }
    n = StepNorm.of(mask, L)
    for mode in LOSS_AGG_MODES:
        assert aggregate(values, mask, mode, n).item() == pytest.approx(ref[mode], rel=1e-6)


# --------------------------------------------------------------------------------------------
# Micro-batch / gradient-accumulation invariance
# --------------------------------------------------------------------------------------------

B, T, D = 8, 7, 4
LENGTHS = [7, 3, 5, 1, 6, 0, 7, 2]  # ragged, one empty row


def _setup(seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, T, D, generator=gen, dtype=F64)
    w0 = torch.randn(D, generator=gen, dtype=F64) * 0.5
    mask = torch.zeros(B, T, dtype=F64)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    adv = torch.randn(B, generator=gen, dtype=F64)
    with torch.no_grad():
        logp0 = -torch.nn.functional.softplus(feats @ w0)
    # old_logp != logp so that clipping is active for some tokens; ref for the KL term
    old = logp0 + 0.4 * torch.randn(B, T, generator=gen, dtype=F64)
    ref = logp0 + 0.3 * torch.randn(B, T, generator=gen, dtype=F64)
    return feats, w0, mask, adv, old, ref


def _loss_and_grad(feats, w0, mask, adv, old, ref, cfg, chunks, norm_fn, scale=1.0):
    """Sum loss.backward() over micro-batches given by `chunks` (sizes). Returns grad, loss sum, metric sums."""
    w = w0.clone().requires_grad_(True)
    total_loss = 0.0
    metrics: dict[str, float] = {}
    start = 0
    for size in chunks:
        sl = slice(start, start + size)
        start += size
        logp = -torch.nn.functional.softplus(feats[sl] @ w)
        norm = norm_fn(mask[sl])
        loss, m = ppo_clip(logp, old[sl], ref[sl], adv[sl], mask[sl], cfg, norm)
        (loss * scale).backward()
        total_loss += loss.item() * scale
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + float(v)
    assert start == B
    return w.grad.clone(), total_loss, metrics


def _splits(mb):
    return [mb] * (B // mb) + ([B % mb] if B % mb else [])


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batch_gradient_invariance(mode, ratio_level):
    feats, w0, mask, adv, old, ref = _setup()
    cfg = make_cfg(
        loss_agg=mode, ratio_level=ratio_level, eps_low=0.2, eps_high=0.28, dual_clip=3.0, beta=0.05,
        kl_placement="loss",
    )
    global_norm = StepNorm.of(mask, norm_len=T)
    full_grad, full_loss, full_m = _loss_and_grad(feats, w0, mask, adv, old, ref, cfg, [B], lambda m: global_norm)
    assert full_grad.abs().max() > 1e-3  # a real gradient
    if ratio_level == "token":  # clipping is active on this batch
        assert full_m["clip_frac_low"] + full_m["clip_frac_high"] > 0
    assert set(full_m) == {"kl_ref", "clip_frac_low", "clip_frac_high", "kl_old", "ratio_mean"}

    for mb in (1, 3, 4):
        chunks = _splits(mb)  # 1 -> 8x1 ; 3 -> 3,3,2 (uneven last) ; 4 -> 4,4
        grad, loss, m = _loss_and_grad(feats, w0, mask, adv, old, ref, cfg, chunks, lambda m: global_norm)
        torch.testing.assert_close(grad, full_grad, rtol=0, atol=1e-6)
        assert loss == pytest.approx(full_loss, abs=1e-6)
        # every metric is a share of the step-level value: shares sum to the full-batch value
        assert m.keys() == full_m.keys()
        for k in full_m:
            assert m[k] == pytest.approx(full_m[k], abs=1e-6), k


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_full_batch_loss_matches_loop_reference(mode):
    """The full-batch ppo_clip loss equals a python-loop PPO-clip + k3 with METHODS.md's aggregation."""
    import math

    feats, w0, mask, adv, old, ref = _setup(seed=1)
    beta, el, eh, c = 0.05, 0.2, 0.28, 3.0
    cfg = make_cfg(loss_agg=mode, eps_low=el, eps_high=eh, dual_clip=c, beta=beta)
    logp = -torch.nn.functional.softplus(feats @ w0)
    loss, _ = ppo_clip(logp, old, ref, adv, mask, cfg, StepNorm.of(mask, norm_len=T))

    per_seq = []  # list of per-token losses of each non-empty sequence
    for i in range(B):
        row = []
        for t in range(T):
            if mask[i, t] == 0:
                continue
            rho = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i].item()
            lt = max(-a * rho, -a * min(max(rho, 1 - el), 1 + eh))
            if a < 0:
                lt = min(lt, -c * a)
            lr = ref[i, t].item() - logp[i, t].item()
            lt += beta * (math.exp(lr) - lr - 1)
            row.append(lt)
        if row:
            per_seq.append(row)
    n_tok = sum(len(r) for r in per_seq)
    expected = {
        "token_mean": sum(sum(r) for r in per_seq) / n_tok,
        "seq_mean_token_mean": sum(sum(r) / len(r) for r in per_seq) / len(per_seq),
        "seq_mean_token_sum": sum(sum(r) for r in per_seq) / len(per_seq),
        "seq_mean_token_sum_norm": sum(sum(r) for r in per_seq) / len(per_seq) / T,
    }[mode]
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_local_micro_batch_norm_gives_different_gradient_token_mean():
    """Documents why the GLOBAL StepNorm matters: normalising each micro-batch by its own token count
    (and averaging over micro-batches, the usual grad-accumulation recipe) changes the gradient when
    masks are ragged."""
    feats, w0, mask, adv, old, ref = _setup()
    cfg = make_cfg(loss_agg="token_mean", eps_low=0.2, eps_high=0.28, beta=0.05)
    global_norm = StepNorm.of(mask, norm_len=T)
    full_grad, full_loss, _ = _loss_and_grad(feats, w0, mask, adv, old, ref, cfg, [B], lambda m: global_norm)
    for mb in (1, 3, 4):
        chunks = _splits(mb)
        # local normaliser, summed (no rescale)
        g_sum, _, _ = _loss_and_grad(feats, w0, mask, adv, old, ref, cfg, chunks, lambda m: StepNorm.of(m, T))
        # local normaliser, averaged over micro-batches
        g_avg, l_avg, _ = _loss_and_grad(
            feats, w0, mask, adv, old, ref, cfg, chunks, lambda m: StepNorm.of(m, T), scale=1.0 / len(chunks)
        )
        assert (g_sum - full_grad).abs().max() > 1e-3
        assert (g_avg - full_grad).abs().max() > 1e-3
        assert abs(l_avg - full_loss) > 1e-4


def test_local_norm_equals_global_with_one_micro_batch():
    feats, w0, mask, adv, old, ref = _setup()
    cfg = make_cfg(loss_agg="token_mean", beta=0.05)
    g_local, _, _ = _loss_and_grad(feats, w0, mask, adv, old, ref, cfg, [B], lambda m: StepNorm.of(m, T))
    g_global, _, _ = _loss_and_grad(
        feats, w0, mask, adv, old, ref, cfg, [B], lambda m: StepNorm.of(mask, norm_len=T)
    )
    torch.testing.assert_close(g_local, g_global, rtol=0, atol=1e-12)
