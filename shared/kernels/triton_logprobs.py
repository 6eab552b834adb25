"""Fused linear + log-softmax-gather (+ entropy) in Triton: selective log-probs without [N, V] logits.

`triton_selective_log_probs(hidden [N, D], weight [V, D], targets [N])` returns, per row,
log softmax(z)[target] and the entropy of softmax(z), where z = (hidden @ weight^T + bias) / T.
Neither direction ever materialises the [N, V] logits (nor a [chunk, V] slab): both kernels walk the
vocabulary in [BLOCK_N, BLOCK_V] register tiles, computing each tile's logits from D-blocks of hidden
and weight with fp32 accumulation.

Forward (`_fwd_kernel`): one program per (row block, vocabulary split). It keeps an online logsumexp
per row over its split (running max m, running sum s = sum exp(z - m), running sum pz = sum exp(z - m) * z
for the entropy, and the target logit), and writes those four [N] statistics per split. The splits are
merged in torch (`combine_vocab_partials`, a few [splits, N] ops) into logp = z_target - lse and
entropy = lse - E_p[z]. Splitting the vocabulary keeps the GPU busy when N is small; only lse [N] is
saved for backward.

Backward (`_bwd_kernel`, also Triton): one program per (row block, vocabulary tile). It recomputes its
logits tile, forms dL/d(h W^T + b) = g * (onehot(target) - exp(z - lse)) / T for the tile, and adds its
contributions dH[rows] += dz @ W[cols], dW[cols] += dz^T @ H[rows], db[cols] += sum_rows dz with fp32
atomics, D-block by D-block. The gradient buffers are fp32 (cast to the input dtype at the end); the
entropy output carries no gradient.

The kernels run on CUDA, or on CPU under Triton's interpreter (TRITON_INTERPRET=1 set before triton is
imported), which is how the tests check them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch shape. Blocks are powers of two >= 16 (the minimum tensor-core dot tile).

    `target_programs` is how many forward programs to aim for by splitting the vocabulary (None: twice
    the GPU's SM count, or 4 off-GPU)."""

    block_n: int = 64
    block_v: int = 128
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 3
    target_programs: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_n", "block_v", "block_d"):
            b = getattr(self, name)
            if b < 16 or b & (b - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {b}")


def vocab_split_plan(n_row_blocks: int, n_vocab_tiles: int, target_programs: int) -> tuple[int, int]:
    """(splits, tiles_per_split) so that n_row_blocks * splits reaches `target_programs` where the
    vocabulary allows it, with every split holding at least one tile (so every partial max is finite)."""
    want = max(1, min(n_vocab_tiles, -(-target_programs // max(n_row_blocks, 1))))
    tiles_per_split = -(-n_vocab_tiles // want)
    return -(-n_vocab_tiles // tiles_per_split), tiles_per_split


def combine_vocab_partials(m: Tensor, s: Tensor, zt: Tensor, pz: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Merge per-split online-softmax statistics, each [splits, N], into (logp, entropy or None, lse) [N].

    Split k holds m_k = max z, s_k = sum exp(z - m_k), pz_k = sum exp(z - m_k) * z over its columns, and
    zt_k = the target logit if the target lies in it (else 0). With M = max_k m_k and c_k = exp(m_k - M):
    lse = M + log sum_k c_k s_k,  logp = sum_k zt_k - lse,  entropy = lse - (sum_k c_k pz_k) / (sum_k c_k s_k).
    """
    top = m.max(0).values
    scale = torch.exp(m - top)
    total = (s * scale).sum(0)
    lse = top + torch.log(total)
    logp = zt.sum(0) - lse
    ent = None if pz is None else lse - (pz * scale).sum(0) / total
    return logp, ent, lse


def dot_precision(dtype: torch.dtype) -> str:
    """Triton dot precision for fp32 operands, following torch's own matmul setting (TF32 only when
    torch allows it), so the fused path is as exact as the chunked F.linear path. Ignored for 16-bit."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation; UPCAST multiplies in fp32 (only used under the interpreter,
    whose numpy matmul would treat bfloat16 blocks as raw 16-bit integers)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd,
                 temperature, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_N, BLOCK_V] fp32 tile of (h @ W^T + b) / T; columns past V are -inf (zero probability)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        h = tl.load(h_ptr + rows[:, None] * stride_hn + ds[None, :] * stride_hd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wv + ds[None, :] * stride_wd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _dot(h, tl.trans(w), acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = acc / temperature
    return tl.where(col_ok[None, :], z, float("-inf"))


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, part_ptr, N, V, D, n_splits, tiles_per_split,
                stride_hn, stride_hd, stride_wv, stride_wd, temperature,
                HAS_BIAS: tl.constexpr, WITH_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Online logsumexp over one vocabulary split for one row block; writes (m, s, z_target, pz) partials
    into part [4, n_splits, N]."""
    pid = tl.program_id(0)
    pid_n = pid // n_splits
    split = pid % n_splits
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    pz = tl.zeros([BLOCK_N], dtype=tl.float32)
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)
    v_start = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_start + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # int64: V * D may pass 2**31
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv,
                         stride_wd, temperature, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION, UPCAST)
        m_new = tl.maximum(m, tl.max(z, 1))  # finite: every tile has at least one real column
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(p, 1)
        if WITH_ENT:
            pz = pz * alpha + tl.sum(p * tl.where(col_ok[None, :], z, 0.0), 1)  # p = 0 off the vocabulary
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
        m = m_new
    out = part_ptr + split * N + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + n_splits * N, s, mask=row_ok)
    tl.store(out + 2 * n_splits * N, zt, mask=row_ok)
    if WITH_ENT:
        tl.store(out + 3 * n_splits * N, pz, mask=row_ok)


@triton.jit
def _bwd_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr, N, V, D, n_vtiles,
                stride_hn, stride_hd, stride_wv, stride_wd, temperature,
                HAS_BIAS: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr):
    """One (row block, vocabulary tile): recompute logits, dz = g (onehot - softmax) / T, and atomically add
    dz @ W into dH, dz^T @ H into dW and column sums of dz into db (all fp32, contiguous [*, D])."""
    pid = tl.program_id(0)
    pid_n = pid // n_vtiles
    pid_v = pid % n_vtiles
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv,
                     stride_wd, temperature, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION, UPCAST)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))  # padding rows: p = 0
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp(z - lse[:, None])
    onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    dz = g[:, None] * (onehot - p) / temperature
    dz = tl.where(row_ok[:, None] & col_ok[None, :], dz, 0.0)
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, 0), mask=col_ok, sem="relaxed")
    dz_in = dz.to(h_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        if NEED_DH:
            w = tl.load(w_ptr + cols[:, None] * stride_wv + ds[None, :] * stride_wd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            dh = _dot(dz_in, w, None, PRECISION, UPCAST)
            tl.atomic_add(dh_ptr + rows[:, None] * D + ds[None, :], dh, mask=row_ok[:, None] & d_ok[None, :],
                          sem="relaxed")
        if NEED_DW:
            h = tl.load(h_ptr + rows[:, None] * stride_hn + ds[None, :] * stride_hd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            dw = _dot(tl.trans(dz_in), h, None, PRECISION, UPCAST)
            tl.atomic_add(dw_ptr + cols[:, None] * D + ds[None, :], dw, mask=col_ok[:, None] & d_ok[None, :],
                          sem="relaxed")


def interpreted() -> bool:
    """Whether these kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_fwd_kernel, triton.runtime.JITFunction)


def _upcast_dots(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreted()


def _target_programs(cfg: KernelConfig, device: torch.device) -> int:
    if cfg.target_programs is not None:
        return cfg.target_programs
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _launch_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
                    with_entropy: bool, cfg: KernelConfig) -> tuple[Tensor, Tensor | None, Tensor]:
    n, d = hidden.shape
    v = weight.shape[0]
    row_blocks = triton.cdiv(n, cfg.block_n)
    splits, tiles_per_split = vocab_split_plan(row_blocks, triton.cdiv(v, cfg.block_v),
                                               _target_programs(cfg, hidden.device))
    part = torch.empty(4 if with_entropy else 3, splits, n, device=hidden.device, dtype=torch.float32)
    _fwd_kernel[(row_blocks * splits,)](
        hidden, weight, bias if bias is not None else hidden, targets, part, n, v, d, splits, tiles_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), temperature,
        HAS_BIAS=bias is not None, WITH_ENT=with_entropy, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
        BLOCK_D=cfg.block_d, PRECISION=dot_precision(hidden.dtype), UPCAST=_upcast_dots(hidden.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return combine_vocab_partials(part[0], part[1], part[2], part[3] if with_entropy else None)


def _launch_backward(grad: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor,
                     temperature: float, need: tuple[bool, bool, bool], cfg: KernelConfig):
    n, d = hidden.shape
    v = weight.shape[0]
    need_h, need_w, need_b = need
    f32 = {"device": hidden.device, "dtype": torch.float32}
    dh = torch.zeros(n, d, **f32) if need_h else None
    dw = torch.zeros(v, d, **f32) if need_w else None
    db = torch.zeros(v, **f32) if need_b else None
    n_vtiles = triton.cdiv(v, cfg.block_v)
    _bwd_kernel[(triton.cdiv(n, cfg.block_n) * n_vtiles,)](
        hidden, weight, bias if bias is not None else hidden, targets, lse, grad,
        dh if dh is not None else lse, dw if dw is not None else lse, db if db is not None else lse,
        n, v, d, n_vtiles, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), temperature,
        HAS_BIAS=bias is not None, NEED_DH=need_h, NEED_DW=need_w, NEED_DB=need_b, BLOCK_N=cfg.block_n,
        BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, PRECISION=dot_precision(hidden.dtype),
        UPCAST=_upcast_dots(hidden.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))


class _FusedSelectiveLogProbs(torch.autograd.Function):
    """Autograd wrapper: Triton forward saving only lse [N]; Triton backward recomputing logits tiles."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, with_entropy, cfg):
        logp, ent, lse = _launch_forward(hidden, weight, bias, targets, temperature, with_entropy, cfg)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.cfg = temperature, cfg
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, _grad_ent):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if grad_logp is None or not any(need):
            return None, None, None, None, None, None, None
        dh, dw, db = _launch_backward(grad_logp.float().contiguous(), hidden, weight, bias, targets, lse,
                                      ctx.temperature, need, ctx.cfg)
        return dh, dw, db, None, None, None, None


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_selective_log_probs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                               bias: Tensor | None = None, with_entropy: bool = False,
                               config: KernelConfig | None = None) -> tuple[Tensor, Tensor | None]:
    """hidden [N, D], weight [V, D], targets [N] (all in [0, V)) -> (logp [N] fp32, entropy [N] fp32 or None).

    Same contract as `shared.logprobs.selective_log_probs`. hidden and weight are multiplied in their
    common dtype (the autocast dtype under autocast); other float dtypes (fp64) are computed in fp32 (the
    logits are fp32 by design there too). Gradients come back in each input's own dtype.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N={hidden.shape[0]}], got {tuple(targets.shape)}")
    cfg = config or KernelConfig()
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty.clone() if with_entropy else None)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if torch.is_autocast_enabled(hidden.device.type):  # as F.linear would under autocast (mixed precision)
        dtype = torch.get_autocast_dtype(hidden.device.type)
    if dtype not in _KERNEL_DTYPES:
        dtype = torch.float32
    hidden, weight = hidden.to(dtype), weight.to(dtype)  # differentiable casts; no-ops when already dtype
    return _FusedSelectiveLogProbs.apply(hidden, weight, bias, targets.contiguous(), float(temperature),
                                         bool(with_entropy), cfg)
