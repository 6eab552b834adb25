"""Chunked, checkpointed selective log-probs (shared/logprobs.py) against the full-logits reference."""

from __future__ import annotations

import pytest
import torch

from shared.logprobs import reference_log_probs, selective_log_probs

N, H, V = 10, 8, 23


def _data(dtype=torch.float32, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.7
    b = torch.randn(V, generator=g, dtype=dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, b, targets


def _reference(hidden, weight, bias, targets, temperature):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return reference_log_probs(logits, targets, temperature)


def _reference_entropy(hidden, weight, bias, temperature):
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


CHUNKS = [1, 3, N, N + 7, 1024]


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_values_match_reference(chunk_size, temperature, with_bias):
    hidden, weight, bias, targets = _data(bias=with_bias)
    lp, ent = selective_log_probs(hidden, weight, targets, temperature, bias, chunk_size)
    assert ent is None
    assert lp.shape == (N,) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, _reference(hidden, weight, bias, targets, temperature), atol=1e-5, rtol=1e-5)
    assert (lp <= 0).all()


def test_values_match_hand_computation_float64():
    hidden, weight, bias, targets = _data(torch.float64, bias=True)
    lp, _ = selective_log_probs(hidden, weight, targets, 0.7, bias, chunk_size=3)
    logits = (hidden @ weight.T + bias) / 0.7
    expected = logits[torch.arange(N), targets] - torch.logsumexp(logits, -1)
    # Logits are computed in fp32 by design, so compare at fp32 precision.
    torch.testing.assert_close(lp.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradients_match_reference(chunk_size, temperature, with_bias):
    hidden, weight, bias, targets = _data(bias=with_bias, seed=1)
    coef = torch.randn(N, generator=torch.Generator().manual_seed(2))  # arbitrary upstream gradient

    def grads(fn):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        b = None if bias is None else bias.clone().requires_grad_(True)
        lp = fn(h, w, b)
        assert lp.requires_grad
        (lp * coef).sum().backward()
        return h.grad, w.grad, (None if b is None else b.grad)

    got = grads(lambda h, w, b: selective_log_probs(h, w, targets, temperature, b, chunk_size)[0])
    ref = grads(lambda h, w, b: _reference(h, w, b, targets, temperature))
    for g_got, g_ref in zip(got, ref):
        if g_ref is None:
            assert g_got is None
            continue
        torch.testing.assert_close(g_got, g_ref, atol=1e-5, rtol=1e-5)


def test_gradients_only_hidden_requires_grad():
    hidden, weight, _, targets = _data(seed=3)
    h = hidden.clone().requires_grad_(True)
    selective_log_probs(h, weight, targets, chunk_size=4)[0].sum().backward()
    h_ref = hidden.clone().requires_grad_(True)
    _reference(h_ref, weight, None, targets, 1.0).sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-5, rtol=1e-5)


def test_gradients_float64_inputs_match_reference():
    hidden, weight, bias, targets = _data(torch.float64, bias=True, seed=4)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    selective_log_probs(h1, w1, targets, 0.7, bias, chunk_size=3)[0].sum().backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    _reference(h2, w2, bias, targets, 0.7).sum().backward()
    assert h1.grad.dtype == torch.float64 and w1.grad.dtype == torch.float64
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-5)


def test_gradient_through_slice_of_larger_tensor():
    # As in LMForward: hidden rows are selected by a boolean mask out of a [B, T, H] tensor.
    g = torch.Generator().manual_seed(5)
    full = torch.randn(2, 6, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g)
    sel = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    targets = torch.randint(0, V, (int(sel.sum()),), generator=g)
    selective_log_probs(full[sel], weight, targets, chunk_size=2)[0].sum().backward()
    got = full.grad.clone()
    full.grad = None
    _reference(full[sel], weight, None, targets, 1.0).sum().backward()
    torch.testing.assert_close(got, full.grad, atol=1e-5, rtol=1e-5)
    assert (got[~sel] == 0).all()


@pytest.mark.parametrize("chunk_size", [1, 3, N + 7])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_entropy_matches_reference(chunk_size, temperature, with_bias):
    hidden, weight, bias, targets = _data(bias=with_bias, seed=6)
    lp, ent = selective_log_probs(hidden, weight, targets, temperature, bias, chunk_size, with_entropy=True)
    assert ent.shape == (N,) and ent.dtype == torch.float32
    torch.testing.assert_close(ent, _reference_entropy(hidden, weight, bias, temperature), atol=1e-5, rtol=1e-5)
    assert (ent >= 0).all() and (ent <= torch.log(torch.tensor(float(V))) + 1e-5).all()
    torch.testing.assert_close(lp, _reference(hidden, weight, bias, targets, temperature), atol=1e-5, rtol=1e-5)


def test_entropy_is_detached_and_logp_differentiable():
    hidden, weight, _, targets = _data(seed=7)
    h = hidden.clone().requires_grad_(True)
    lp, ent = selective_log_probs(h, weight, targets, chunk_size=4, with_entropy=True)
    assert lp.requires_grad
    assert not ent.requires_grad


def test_entropy_of_uniform_distribution():
    hidden = torch.zeros(4, H)
    weight = torch.randn(V, H)
    lp, ent = selective_log_probs(hidden, weight, torch.zeros(4, dtype=torch.long), with_entropy=True)
    expected = torch.log(torch.tensor(float(V)))
    torch.testing.assert_close(ent, expected.expand(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(lp, -expected.expand(4), atol=1e-6, rtol=0)


def test_no_grad_path():
    hidden, weight, bias, targets = _data(bias=True, seed=8)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    with torch.no_grad():
        lp, ent = selective_log_probs(h, w, targets, 0.7, bias, chunk_size=3, with_entropy=True)
    assert not lp.requires_grad and lp.grad_fn is None
    torch.testing.assert_close(lp, _reference(hidden, weight, bias, targets, 0.7), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, _reference_entropy(hidden, weight, bias, 0.7), atol=1e-5, rtol=1e-5)
    # Inputs that do not require grad, with grad mode on, take the same path.
    lp2, _ = selective_log_probs(hidden, weight, targets, 0.7, bias, chunk_size=3)
    assert not lp2.requires_grad
    torch.testing.assert_close(lp2, lp, atol=0, rtol=0)


def test_chunking_does_not_change_values():
    hidden, weight, bias, targets = _data(bias=True, seed=9)
    outs = [selective_log_probs(hidden, weight, targets, 0.7, bias, c, with_entropy=True) for c in CHUNKS]
    for lp, ent in outs[1:]:
        torch.testing.assert_close(lp, outs[0][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ent, outs[0][1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_empty_input(with_entropy, requires_grad):
    hidden = torch.zeros(0, H, requires_grad=requires_grad)
    weight = torch.randn(V, H, requires_grad=requires_grad)
    lp, ent = selective_log_probs(hidden, weight, torch.zeros(0, dtype=torch.long), with_entropy=with_entropy)
    assert lp.shape == (0,) and lp.dtype == torch.float32
    if with_entropy:
        assert ent.shape == (0,) and ent.dtype == torch.float32
    else:
        assert ent is None


def test_bfloat16_inputs_give_fp32_outputs():
    hidden, weight, _, targets = _data(seed=10)
    lp, ent = selective_log_probs(hidden.bfloat16(), weight.bfloat16(), targets, chunk_size=4, with_entropy=True)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    ref = _reference(hidden.bfloat16(), weight.bfloat16(), None, targets, 1.0)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)


def test_reference_log_probs_hand_values():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    lp = reference_log_probs(logits, torch.tensor([1, 0]))
    expected = torch.tensor([-torch.log(torch.tensor(2.0)).item(),
                             2.0 - torch.logsumexp(torch.tensor([2.0, 0.0]), 0).item()])
    torch.testing.assert_close(lp, expected)
    lp_t = reference_log_probs(logits, torch.tensor([1, 0]), temperature=0.5)
    torch.testing.assert_close(lp_t[1], 4.0 - torch.logsumexp(torch.tensor([4.0, 0.0]), 0))


def test_gradient_when_only_bias_requires_grad():
    hidden, weight, bias, targets = _data(bias=True, seed=11)
    b = bias.clone().requires_grad_(True)
    selective_log_probs(hidden, weight, targets, 0.7, b, chunk_size=3)[0].sum().backward()
    b_ref = bias.clone().requires_grad_(True)
    _reference(hidden, weight, b_ref, targets, 0.7).sum().backward()
    torch.testing.assert_close(b.grad, b_ref.grad, atol=1e-5, rtol=1e-5)


def test_loss_using_entropy_backpropagates_through_logp_only():
    hidden, weight, _, targets = _data(seed=12)
    h = hidden.clone().requires_grad_(True)
    lp, ent = selective_log_probs(h, weight, targets, 0.7, chunk_size=4, with_entropy=True)
    (lp + 0.1 * ent).sum().backward()
    h_ref = hidden.clone().requires_grad_(True)
    _reference(h_ref, weight, None, targets, 0.7).sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-5, rtol=1e-5)


def test_large_logits_stay_finite_and_exact():
    # Logits of magnitude ~100: the max-shifted logsumexp and entropy keep full precision.
    hidden, weight, bias, targets = _data(torch.float64, bias=True, seed=13)
    hidden = hidden * 30
    lp, ent = selective_log_probs(hidden.float(), weight.float(), targets, 0.7, bias.float(), 4, with_entropy=True)
    z = torch.log_softmax((hidden @ weight.T + bias) / 0.7, -1)
    torch.testing.assert_close(lp.double(), z.gather(-1, targets[:, None]).squeeze(-1), atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(ent.double(), -(z.exp() * z).sum(-1), atol=2e-4, rtol=1e-4)


def test_backend_chunked_and_auto_on_cpu_agree_with_default():
    hidden, weight, bias, targets = _data(bias=True, seed=14)
    default = selective_log_probs(hidden, weight, targets, 0.7, bias, 3, True)
    for backend in ("chunked", "auto"):
        lp, ent = selective_log_probs(hidden, weight, targets, 0.7, bias, 3, True, backend=backend)
        torch.testing.assert_close(lp, default[0], atol=0, rtol=0)
        torch.testing.assert_close(ent, default[1], atol=0, rtol=0)


def test_unknown_backend_and_bad_chunk_size_raise():
    hidden, weight, _, targets = _data()
    with pytest.raises(ValueError, match="backend"):
        selective_log_probs(hidden, weight, targets, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        selective_log_probs(hidden, weight, targets, chunk_size=0, backend="chunked")


def test_triton_backend_unusable_raises_one_line_value_error(monkeypatch):
    import shared.logprobs as lp_mod

    hidden, weight, _, targets = _data()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton'") as err:  # CPU tensors, no interpreter
        selective_log_probs(hidden, weight, targets, backend="triton")
    assert "\n" not in str(err.value)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(lp_mod, "_triton_importable", lambda: False)  # as if triton were not installed
    with pytest.raises(ValueError, match="backend='triton'.*triton") as err:
        selective_log_probs(hidden, weight, targets, backend="triton")
    assert "\n" not in str(err.value)


def test_importing_logprobs_does_not_import_triton():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, shared.logprobs; assert 'triton' not in sys.modules, 'triton imported'"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]


def test_auto_backend_picks_triton_only_for_cuda_tensors_when_importable(monkeypatch):
    from types import SimpleNamespace

    import shared.logprobs as lp_mod

    cuda = SimpleNamespace(is_cuda=True, device="cuda:0")
    cpu = SimpleNamespace(is_cuda=False, device="cpu")
    monkeypatch.setattr(lp_mod, "_triton_importable", lambda: True)
    assert lp_mod.resolve_backend("auto", cuda) == "triton"
    assert lp_mod.resolve_backend("auto", cpu) == "chunked"
    assert lp_mod.resolve_backend("chunked", cuda) == "chunked"
    assert lp_mod.resolve_backend("triton", cuda) == "triton"
    monkeypatch.setattr(lp_mod, "_triton_importable", lambda: False)
    assert lp_mod.resolve_backend("auto", cuda) == "chunked"
    with pytest.raises(ValueError, match="backend='triton'"):
        lp_mod.resolve_backend("triton", cuda)
