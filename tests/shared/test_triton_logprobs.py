"""Fused Triton selective log-probs (shared/kernels/triton_logprobs.py) against the plain reference.

The kernels run on CPU in Triton's interpreter, which has to be switched on before triton is imported
(the @triton.jit decorator picks interpreter or compiler when the kernel module is imported). Other
test modules may import triton first (transformers and torch do, lazily), so the checks always run in
a fresh process started with TRITON_INTERPRET=1 (`test_whole_module_in_interpreter_subprocess`); in
the parent pytest process they skip.
Sizes are tiny and odd (N=37, H=24, V=203 with 16/32/16 tiles) so every tile kind is exercised: partial
row blocks, a partial last vocabulary tile, a partial last D block and several vocabulary splits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from shared.kernels import triton_logprobs as tk
from shared.logprobs import reference_log_probs, selective_log_probs

SUBPROCESS = os.environ.get("RLFT_TRITON_SUBPROCESS") == "1"  # the fresh interpreter-mode process
IN_PROCESS = SUBPROCESS and tk.interpreted()
needs_interpreter = pytest.mark.skipif(not IN_PROCESS, reason="kernels compiled without the interpreter in this "
                                       "process; covered by test_whole_module_in_interpreter_subprocess")

N, H, V = 37, 24, 203
SMALL = tk.KernelConfig(block_n=16, block_v=32, block_d=16, target_programs=9)  # 3 row blocks x 3 splits


def _data(dtype=torch.float32, bias=False, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g) * scale
    weight = torch.randn(V, H, generator=g) * 0.7
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    coef = torch.randn(N, generator=g)  # arbitrary upstream gradient
    return hidden.to(dtype), weight.to(dtype), b, targets, coef


def _reference(hidden, weight, bias, targets, temperature):
    """(logp, entropy) from full fp32 logits of the (possibly low-precision) inputs."""
    logits = torch.nn.functional.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    logp = reference_log_probs(logits, targets, temperature)
    z = torch.log_softmax(logits.detach() / temperature, -1)
    return logp, -(z.exp() * z).sum(-1)


def _run(fn, hidden, weight, bias, coef, grad=(True, True, True)):
    """Forward + backward of sum(coef * logp); returns (logp, entropy, (dH, dW, db))."""
    h = hidden.clone().requires_grad_(grad[0])
    w = weight.clone().requires_grad_(grad[1])
    b = None if bias is None else bias.clone().requires_grad_(grad[2])
    lp, ent = fn(h, w, b)
    if lp.requires_grad:
        (lp * coef).sum().backward()
    return lp.detach(), ent, (h.grad, w.grad, None if b is None else b.grad)


def _assert_grads_close(got, ref, atol, rtol):
    for name, g_got, g_ref in zip(("hidden", "weight", "bias"), got, ref):
        if g_ref is None:
            assert g_got is None, name
            continue
        assert g_got is not None and g_got.dtype == g_ref.dtype, name
        torch.testing.assert_close(g_got.float(), g_ref.float(), atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@needs_interpreter
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_values_entropy_and_grads_match_reference(with_bias, temperature):
    hidden, weight, bias, targets, coef = _data(bias=with_bias, seed=1)
    lp, ent, grads = _run(lambda h, w, b: tk.triton_selective_log_probs(h, w, targets, temperature, b, True, SMALL),
                          hidden, weight, bias, coef)
    ref_lp, ref_ent, ref_grads = _run(lambda h, w, b: _reference(h, w, b, targets, temperature),
                                      hidden, weight, bias, coef)
    assert lp.shape == (N,) and lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert not ent.requires_grad
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    _assert_grads_close(grads, ref_grads, atol=2e-5, rtol=1e-5)


@needs_interpreter
def test_default_tiles_single_split_and_only_hidden_grad():
    # Default config: one 64-row block covers N=37, V=203 spans two 128-wide tiles; weight/bias get no grad.
    hidden, weight, bias, targets, coef = _data(bias=True, seed=2)
    grad = (True, False, False)
    lp, ent, grads = _run(lambda h, w, b: tk.triton_selective_log_probs(h, w, targets, 0.7, b), hidden, weight,
                          bias, coef, grad)
    ref_lp, _, ref_grads = _run(lambda h, w, b: _reference(h, w, b, targets, 0.7), hidden, weight, bias, coef, grad)
    assert ent is None
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    _assert_grads_close(grads, ref_grads, atol=2e-5, rtol=1e-5)


@needs_interpreter
def test_large_logits_online_rescaling():
    # Logits of magnitude ~100 (max shifts between tiles and splits): the online max keeps exp finite.
    hidden, weight, bias, targets, coef = _data(bias=True, seed=3, scale=30.0)
    lp, ent, grads = _run(lambda h, w, b: tk.triton_selective_log_probs(h, w, targets, 0.7, b, True, SMALL),
                          hidden, weight, bias, coef)
    ref_lp, ref_ent, ref_grads = _run(lambda h, w, b: _reference(h, w, b, targets, 0.7), hidden, weight, bias, coef)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(lp, ref_lp, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=2e-4, rtol=1e-4)
    _assert_grads_close(grads, ref_grads, atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_bfloat16_inputs_fp32_outputs_and_bf16_grads():
    hidden, weight, _, targets, coef = _data(torch.bfloat16, seed=4)
    lp, ent, grads = _run(lambda h, w, b: tk.triton_selective_log_probs(h, w, targets, 0.7, b, True, SMALL),
                          hidden, weight, None, coef)
    ref_lp, ref_ent, ref_grads = _run(lambda h, w, b: _reference(h, w, b, targets, 0.7), hidden, weight, None, coef)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    # The kernel keeps fp32 logits of the bf16 inputs, exactly what the reference computes.
    torch.testing.assert_close(lp, ref_lp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-4, rtol=1e-5)
    # dz is rounded to bf16 before the gradient matmuls (as autograd does for bf16 weights).
    _assert_grads_close(grads, ref_grads, atol=5e-2, rtol=2e-2)


@needs_interpreter
def test_float64_inputs_give_float64_grads():
    hidden, weight, bias, targets, coef = _data(torch.float64, bias=True, seed=5)
    lp, _, grads = _run(lambda h, w, b: tk.triton_selective_log_probs(h, w, targets, 0.7, b, False, SMALL),
                        hidden, weight, bias, coef)
    ref_lp, _, ref_grads = _run(lambda h, w, b: _reference(h, w, b, targets, 0.7), hidden, weight, bias, coef)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    _assert_grads_close(grads, [g.double() for g in ref_grads], atol=2e-5, rtol=1e-5)


@needs_interpreter
def test_dispatch_backend_triton_matches_chunked():
    hidden, weight, bias, targets, _ = _data(bias=True, seed=6)
    lp_t, ent_t = selective_log_probs(hidden, weight, targets, 0.7, bias, with_entropy=True, backend="triton")
    lp_c, ent_c = selective_log_probs(hidden, weight, targets, 0.7, bias, 5, True, backend="chunked")
    torch.testing.assert_close(lp_t, lp_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_t, ent_c, atol=1e-5, rtol=1e-5)
    # CPU tensors: "auto" stays on the chunked path even with triton importable.
    lp_a, _ = selective_log_probs(hidden, weight, targets, 0.7, bias, 5, backend="auto")
    torch.testing.assert_close(lp_a, lp_c, atol=0, rtol=0)


@needs_interpreter
def test_no_grad_and_empty_input():
    hidden, weight, _, targets, _ = _data(seed=7)
    with torch.no_grad():
        lp, _ = tk.triton_selective_log_probs(hidden.requires_grad_(), weight, targets, 1.0, None, False, SMALL)
    assert lp.grad_fn is None
    torch.testing.assert_close(lp, _reference(hidden.detach(), weight, None, targets, 1.0)[0], atol=1e-5, rtol=1e-5)
    lp0, ent0 = tk.triton_selective_log_probs(torch.zeros(0, H), weight, torch.zeros(0, dtype=torch.long),
                                              with_entropy=True)
    assert lp0.shape == (0,) and ent0.shape == (0,) and lp0.dtype == torch.float32


def test_combine_vocab_partials_equals_one_pass():
    # Split the vocabulary of random logits 4 ways by hand; merging the partials gives the full answers.
    g = torch.Generator().manual_seed(8)
    z = torch.randn(5, 50, generator=g, dtype=torch.float64) * 4
    tgt = torch.tensor([0, 13, 27, 49, 30])
    m, s, zt, pz = [], [], [], []
    for part, cols in zip(z.split([7, 20, 3, 20], 1), torch.arange(50).split([7, 20, 3, 20])):
        top = part.max(-1).values
        e = torch.exp(part - top[:, None])
        m.append(top), s.append(e.sum(-1)), pz.append((e * part).sum(-1))
        hit = tgt[:, None] == cols[None, :]
        zt.append((part * hit).sum(-1))
    logp, ent, lse = tk.combine_vocab_partials(*(torch.stack(x) for x in (m, s, zt, pz)))
    ref = torch.log_softmax(z, -1)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1))
    torch.testing.assert_close(logp, ref.gather(-1, tgt[:, None]).squeeze(-1))
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1))


@pytest.mark.parametrize("rows, tiles, target", [(1, 7, 9), (3, 7, 9), (3, 1, 64), (100, 50, 4), (2, 5, 1000)])
def test_vocab_split_plan_covers_every_tile_once(rows, tiles, target):
    splits, per = tk.vocab_split_plan(rows, tiles, target)
    assert 1 <= splits <= tiles
    assert (splits - 1) * per < tiles <= splits * per  # every split non-empty, all tiles covered
    want = min(tiles, -(-target // rows))  # splits needed to reach the target program count
    assert splits <= max(want, 1)
    assert (splits > 1) == (want > 1)  # the vocabulary is split whenever the row blocks alone are too few


def test_kernel_config_rejects_tiles_tensor_cores_cannot_take():
    with pytest.raises(ValueError, match="block_v"):
        tk.KernelConfig(block_v=8)
    with pytest.raises(ValueError, match="block_n"):
        tk.KernelConfig(block_n=48)


_CUDA_CHECK = """
import torch
from shared.kernels import triton_logprobs as tk
from shared.logprobs import reference_log_probs, selective_log_probs
assert not tk.interpreted()
g = torch.Generator().manual_seed(0)
n, d, v = 301, 96, 5003
for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
    h = torch.randn(n, d, generator=g).cuda().to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).cuda().to(dtype).requires_grad_()
    b = torch.randn(v, generator=g).cuda().requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).cuda()
    c = torch.randn(n, generator=g).cuda()
    lp, ent = selective_log_probs(h, w, t, 0.7, b, with_entropy=True)  # auto -> triton on CUDA
    (lp * c).sum().backward()
    got = [lp.detach(), ent, h.grad.float(), w.grad.float(), b.grad]
    h.grad = w.grad = b.grad = None
    logits = torch.nn.functional.linear(h.float(), w.float(), b)
    ref_lp = reference_log_probs(logits, t, 0.7)
    (ref_lp * c).sum().backward()
    z = torch.log_softmax(logits.detach() / 0.7, -1)
    ref = [ref_lp.detach(), -(z.exp() * z).sum(-1), h.grad.float(), w.grad.float(), b.grad]
    for name, x, y in zip(("logp", "entropy", "dh", "dw", "db"), got, ref):
        err = float((x - y).abs().max() / y.abs().max())
        assert err < tol, (str(dtype), name, err)
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_on_cuda_match_reference():
    # The compiled (non-interpreted) kernels, in a process without TRITON_INTERPRET.
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _CUDA_CHECK], cwd=Path(__file__).resolve().parents[2], env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


@pytest.mark.skipif(SUBPROCESS, reason="this is the subprocess")
def test_whole_module_in_interpreter_subprocess():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "RLFT_TRITON_SUBPROCESS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not subprocess and not cuda",
                          str(Path(__file__))], cwd=root, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, out.stdout[-2000:]
