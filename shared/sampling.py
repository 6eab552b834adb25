"""Batch-invariant sampling: inverse-CDF draws from counter-based uniforms.

A token y ~ softmax(z), z = warp(logits) (temperature, top-k, top-p), is drawn by inverting the CDF with one
uniform u in [0, 1) per row:

    C_v = sum_{w <= v} exp(z_w - max z)        (per-row cumulative sum, accumulated in float64)
    y   = min{v : C_v > u * C_V}               (the first token whose cumulative mass passes u)

u is a hash of (seed, sample id, position) and the rest is a per-row function of that row's logits: the draw
for a given completion does not depend on which process generates it, how the batch is split, or what ran
before, so one process and N processes produce the same rollouts, and a resumed run samples exactly what the
uninterrupted run would have. No RNG state needs saving. The hash is a 32-bit integer mixer (xorshift-
multiply rounds) evaluated with int64 tensor ops (and the same arithmetic on Python ints for the scalar seed
and position), so u is bit-identical on CPU and GPU; all 64 bits of a sample id count, so the id ranges that
second attempts, MRT and step-value continuations offset by 2**40 and more get noise of their own.

Cost: one hash per row and O(V) float work per row (exp, cumsum, a binary search), against the Gumbel-max
form argmax(z + g) that needs a hashed uniform and two logs per vocabulary entry. Gumbel-max was this module's
previous method: 0.78x the tokens/s of plain `generate(do_sample=True)` at vocabulary 32k on CPU, against
1.8x at 32k and 1.4x at 152k for this one (benchmarks/bench_rollout.py). The cumulative sum is float64: in
float32, once it passes 0.5 every increment below 3e-8 rounds away and larger ones round to multiples of
6e-8, which biases the tail (a 150k vocabulary of such tokens can lose ~0.5% of its mass); u has 53 random
bits to match. Tokens with probability 0 (filtered by top-k/top-p, or underflowed) are never drawn.
"""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_POS_HI, _POS_LO = 0x9E3779B, 0x632BE5A  # salts of the two 32-bit words of a uniform
_HIGH_SALT = 0x5BD1E995  # salt of the high 32 bits of a sample id or seed


def _mix32(x):
    """32-bit mixer of a tensor (int64) or a Python int: the same arithmetic on both."""
    # Constants below 2**31 keep every product of a 32-bit value within int64 (no overflow).
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _M32
    x = ((x ^ (x >> 12)) * 0x297A2D39) & _M32
    return x ^ (x >> 15)


def _hash64(x):
    """32-bit hash of a 64-bit value (tensor or Python int): both halves count, so ids offset by 2**40
    (second attempts, MRT, step-value continuations) get noise of their own. Injective below 2**32."""
    return _mix32(x) ^ _mix32(((x >> 32) & _M32) + _HIGH_SALT)


def row_keys(seed: int, sample_ids: Tensor) -> Tensor:
    """Per-sample 32-bit keys [B] (int64): a hash of (seed, sample id), the part of the noise fixed for a whole
    completion (CounterSamplingProcessor computes it once per `generate` call)."""
    return _mix32(_hash64(sample_ids.to(torch.int64)) ^ _mix32(_hash64(seed)))


def counter_uniform(seed: int, sample_ids: Tensor, position: int, keys: Tensor | None = None) -> Tensor:
    """u[b] in [0, 1) float64 with 53 random bits, a pure function of (seed, sample_ids[b], position).
    `keys` = row_keys(seed, sample_ids), when already computed."""
    h = row_keys(seed, sample_ids) if keys is None else keys
    hi = _mix32(h ^ _mix32((position + _POS_HI) & _M32))  # position hashed on the host: a Python int
    lo = _mix32(h ^ _mix32((position + _POS_LO) & _M32))
    return ((hi << 21) | (lo >> 11)).to(torch.float64) / 9007199254740992.0  # / 2**53, exact


def warp_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """logits / T, then top-k and nucleus filtering (removed entries set to -inf). float32; may return
    `logits` itself when it is float32 and nothing changes it (callers must not modify the result in place)."""
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, idx = torch.sort(x, dim=-1, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = cum - sorted_x.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return x


def inverse_cdf(z: Tensor, u: Tensor) -> Tensor:
    """Index [B] of the first entry of each row whose cumulative mass of softmax(z[b]) exceeds u[b] (u in [0, 1)).

    C = cumsum(exp(z - max z)) in float64 (C_V is the row's total mass). The target u * C_V can round up to
    C_V when u is within 2**-53 of 1; the draw is then clamped to the last token with positive mass
    (the first index where C reaches C_V), so a zero-probability token is never returned."""
    c = (z - z.amax(-1, keepdim=True)).exp_().double().cumsum_(-1)  # [B, V]
    total = c[:, -1:].contiguous()
    drawn = torch.searchsorted(c, u.to(c).unsqueeze(1) * total, right=True)
    last_positive = torch.searchsorted(c, total)
    return torch.minimum(drawn, last_positive).squeeze(1)


def sample_tokens(logits: Tensor, seed: int, sample_ids: Tensor, position: int, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, keys: Tensor | None = None) -> Tensor:
    """One token per row, distributed as softmax(warp(logits)), reproducible per (seed, id, position)."""
    z = warp_logits(logits, temperature, top_k, top_p)
    return inverse_cdf(z, counter_uniform(seed, sample_ids, position, keys).to(z.device))


class CounterSamplingProcessor:
    """A transformers LogitsProcessor that turns greedy `generate` into counter-based sampling.

    Use with do_sample=False: it returns scores whose argmax is the sampled token (all others -inf).
    `position` is the number of tokens generated so far, so noise is aligned with the completion.
    """

    def __init__(self, seed: int, sample_ids: Tensor, prompt_len: int, temperature: float, top_k: int, top_p: float):
        self.seed, self.sample_ids, self.prompt_len = seed, sample_ids, prompt_len
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self._keys: Tensor | None = None  # row_keys(seed, sample_ids) on the scores' device, computed once

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        pos = input_ids.shape[1] - self.prompt_len
        if self._keys is None or self._keys.device != scores.device:
            self._keys = row_keys(self.seed, self.sample_ids.to(scores.device))
        tok = sample_tokens(scores, self.seed, self.sample_ids, pos, self.temperature, self.top_k, self.top_p,
                            keys=self._keys)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, tok.unsqueeze(-1), 0.0)
