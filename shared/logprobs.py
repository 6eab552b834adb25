"""Per-token log-probabilities of chosen tokens without a full-vocabulary fp32 log-softmax.

`selective_log_probs(hidden, weight, targets)` computes log softmax(hidden @ W^T / T)[target] and
the entropy of that distribution, a chunk of positions at a time. The forward keeps only the per-row
logsumexp; the backward recomputes each chunk's logits once from it (a hand-written autograd Function,
cheaper than activation checkpointing, which would re-run the forward under autograd and then the
generic backward), so neither direction holds more than one chunk's [chunk, V] logits: peak memory is
O(chunk * V) instead of O(N * V). `reference_log_probs` is the plain log_softmax + gather twin used by
the tests.

On CUDA the same contract is served by a fused Triton kernel (shared/kernels/triton_logprobs.py) that
walks the vocabulary in register tiles with an online logsumexp, forward and backward, so it holds no
[chunk, V] slab at all. `backend` picks the path; triton is imported only when that path is taken, so
importing this module never needs (or loads) triton.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float,
                 out: Tensor | None = None) -> Tensor:
    """(h W^T + b) / T as fp32 [rows, V]. For fp32 inputs the matmul writes into `out[:rows]` when given, so
    one buffer serves every chunk: a fresh [chunk, V] allocation per chunk would be page-faulted in anew
    each time on CPU (glibc mmaps blocks over 32 MiB and unmaps them on free)."""
    if out is not None and h.dtype == torch.float32 and weight.dtype == torch.float32:
        z = out[: h.shape[0]]
        if bias is None:
            torch.mm(h, weight.T, out=z)
        else:
            torch.addmm(bias.float(), h, weight.T, out=z)
    else:
        z = torch.nn.functional.linear(h, weight, bias).float()
    return z.div_(temperature) if temperature != 1.0 else z


def chunk_log_probs(h: Tensor, weight: Tensor, bias: Tensor | None, tgt: Tensor, temperature: float,
                    with_entropy: bool = False, out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp, lse, entropy or None) [chunk] fp32 for one chunk of positions, from ONE logits matmul.

    The logits buffer is then overwritten in place (z - max, exp, and for the entropy e log e), so one
    [chunk, V] fp32 buffer is all this holds: with e = exp(z - max) and s = sum e, lse = max + log s and
    entropy = log s - sum(e (z - max)) / s = log s - sum(e log e) / s.
    """
    z = chunk_logits(h, weight, bias, temperature, out)
    z_tgt = z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    top = z.amax(-1, keepdim=True)
    e = z.sub_(top).exp_()
    total = e.sum(-1)
    ent = torch.log(total) - torch.xlogy(e, e, out=e).sum(-1) / total if with_entropy else None
    lse = top.squeeze(-1) + torch.log(total)
    return z_tgt - lse, lse, ent


def chunk_logit_grad(h: Tensor, weight: Tensor, bias: Tensor | None, tgt: Tensor, lse: Tensor, grad: Tensor,
                     temperature: float, out: Tensor | None = None) -> Tensor:
    """d(sum grad * logp) / d(h W^T + b) for one chunk, [chunk, V] fp32: grad * (onehot(tgt) - softmax) / T,
    with the softmax recomputed from the saved lse (one matmul, then in place)."""
    z = chunk_logits(h, weight, bias, temperature, out)
    coef = grad.float() / temperature
    dz = z.sub_(lse.unsqueeze(-1)).exp_().mul_(-coef.unsqueeze(-1))  # -coef * softmax
    dz[torch.arange(h.shape[0], device=h.device), tgt] += coef
    return dz


def _chunk_buffer(hidden: Tensor, weight: Tensor, chunk_size: int) -> Tensor:
    return torch.empty(min(chunk_size, hidden.shape[0]), weight.shape[0], device=hidden.device, dtype=torch.float32)


class _ChunkedSelectiveLogProbs(torch.autograd.Function):
    """Chunked forward that saves only lse [N]; chunked backward that recomputes each chunk's logits once.

    Same memory bound as activation checkpointing (one [chunk, V] buffer, reused by every chunk) without
    its cost: checkpointing re-runs the whole chunk forward (logsumexp, gather) under autograd and then
    runs the generic log-softmax/gather backward with its own [chunk, V] temporaries; here backward is one
    matmul for the logits, three in-place passes for the softmax gradient, and the two gradient matmuls.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, with_entropy):
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=torch.float32)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else None
        buf = _chunk_buffer(hidden, weight, chunk_size)
        for s in range(0, n, chunk_size):
            sl = slice(s, s + chunk_size)
            lp_c, lse_c, ent_c = chunk_log_probs(hidden[sl], weight, bias, targets[sl], temperature, with_entropy,
                                                 buf)
            logp[sl], lse[sl] = lp_c, lse_c
            if with_entropy:
                ent[sl] = ent_c
        del buf
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, _grad_ent):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else None
        dw = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_w else None
        db = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_b else None
        if grad_logp is not None and (need_h or need_w or need_b):
            buf = _chunk_buffer(hidden, weight, ctx.chunk_size)
            for s in range(0, hidden.shape[0], ctx.chunk_size):
                sl = slice(s, s + ctx.chunk_size)
                h = hidden[sl]
                dz = chunk_logit_grad(h, weight, bias, targets[sl], lse[sl], grad_logp[sl], ctx.temperature, buf)
                if need_b:
                    db += dz.sum(0)
                dz = dz.to(hidden.dtype)
                if need_h:
                    torch.mm(dz, weight, out=dh[sl])
                if need_w:
                    dw.addmm_(dz.T, h)
                del dz  # (non-fp32 inputs) free this chunk's buffer before the next one is allocated
        elif need_h:
            dh.zero_()
        return dh, dw, (db.to(bias.dtype) if need_b else None), None, None, None, None


def selective_log_probs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    bias: Tensor | None = None,
    chunk_size: int = 512,
    with_entropy: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """hidden [N, H], weight [V, H], targets [N] -> (logp [N] fp32, entropy [N] fp32 or None).

    backend: "chunked" (PyTorch, `chunk_size` positions at a time), "triton" (fused kernel; `chunk_size`
    unused) or "auto" (triton when the tensors are on CUDA and triton imports, else chunked).
    The chunked path holds one [chunk_size, V] fp32 buffer; 512 is the default because on CPU 512-2048
    take about the same time (256 is ~5% and 128 ~15% slower: smaller GEMMs), so memory decides
    (benchmarks/bench_logprobs.py).
    """
    if resolve_backend(backend, hidden) == "triton":
        from shared.kernels.triton_logprobs import triton_selective_log_probs

        return triton_selective_log_probs(hidden, weight, targets, temperature, bias, with_entropy)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty.clone() if with_entropy else None)
    return _ChunkedSelectiveLogProbs.apply(hidden, weight, bias, targets, float(temperature), int(chunk_size),
                                           bool(with_entropy))


BACKENDS = ("auto", "chunked", "triton")


@functools.cache
def _triton_importable() -> bool:
    """Whether the fused kernel module imports (triton installed and working); checked once, lazily."""
    try:
        import shared.kernels.triton_logprobs  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # not installed, or a broken install / driver
        return False
    return True


def _triton_interpreter() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1) can run the kernel on CPU tensors (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_unavailable(cuda: bool) -> str | None:
    """Why the triton backend cannot run on this machine (CUDA or the interpreter, and the package), or None."""
    if not (cuda or _triton_interpreter()):
        return "no CUDA GPU is visible"
    if not _triton_importable():
        return "the triton package does not import"
    return None


def resolve_backend(backend: str, hidden: Tensor) -> str:
    """"chunked" or "triton" for this call; ValueError for an unknown or unusable `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "chunked":
        return "chunked"
    if backend == "auto":
        return "triton" if hidden.is_cuda and _triton_importable() else "chunked"
    if not (hidden.is_cuda or _triton_interpreter()):
        raise ValueError(f"backend='triton' needs CUDA tensors (got {hidden.device}); use backend='chunked' or 'auto'")
    if not _triton_importable():
        raise ValueError("backend='triton' needs the triton package, which does not import here; use backend='chunked'")
    return "triton"


def reference_log_probs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Plain twin: log_softmax over the full vocabulary, then gather."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
