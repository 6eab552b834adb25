"""Batch-invariant sampling: Gumbel-max with counter-based noise.

Sampling token y ~ softmax(logits / T) is done as y = argmax(logits / T + g) with Gumbel noise
g = -log(-log u), where u is a hash of (seed, sample id, position, vocabulary index). The noise for
a given completion therefore does not depend on which process generates it, how the batch is
split, or what ran before: one process and N processes produce the same rollouts, and a resumed
run samples exactly what the uninterrupted run would have. No RNG state needs saving.

The hash is a 32-bit integer mixer (xorshift-multiply rounds) evaluated with int64 tensor ops, so
it is vectorised and identical on CPU and GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    # Constants below 2**31 keep every product of a 32-bit value within int64 (no overflow).
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _M32
    x = ((x ^ (x >> 12)) * 0x297A2D39) & _M32
    return x ^ (x >> 15)


def counter_uniform(seed: int, sample_ids: Tensor, position: int, vocab_size: int) -> Tensor:
    """u[b, v] in (0, 1), a pure function of (seed, sample_ids[b], position, v)."""
    dev = sample_ids.device
    h = _mix32(torch.full_like(sample_ids, seed & _M32) ^ _mix32(sample_ids.to(torch.int64)))
    h = _mix32(h ^ _mix32(torch.full_like(h, position + 0x9E3779B)))  # [B]
    v = torch.arange(vocab_size, device=dev, dtype=torch.int64)
    bits = _mix32(h.unsqueeze(1) ^ _mix32(v + 0x632BE5A).unsqueeze(0))  # [B, V]
    return (bits.to(torch.float64) + 0.5) / 4294967296.0


def gumbel_noise(seed: int, sample_ids: Tensor, position: int, vocab_size: int) -> Tensor:
    u = counter_uniform(seed, sample_ids, position, vocab_size)
    return -torch.log(-torch.log(u))


def warp_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """logits / T, then top-k and nucleus filtering (removed entries set to -inf)."""
    x = logits.float() / temperature
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, idx = torch.sort(x, dim=-1, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = cum - sorted_x.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return x


def sample_tokens(logits: Tensor, seed: int, sample_ids: Tensor, position: int, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """One token per row, distributed as softmax(warp(logits)), reproducible per (seed, id, position)."""
    x = warp_logits(logits, temperature, top_k, top_p)
    g = gumbel_noise(seed, sample_ids, position, x.shape[-1]).to(x.dtype)
    return (x + g).argmax(-1)


class CounterSamplingProcessor:
    """A transformers LogitsProcessor that turns greedy `generate` into counter-based sampling.

    Use with do_sample=False: it returns scores whose argmax is the sampled token (all others -inf).
    `position` is the number of tokens generated so far, so noise is aligned with the completion.
    """

    def __init__(self, seed: int, sample_ids: Tensor, prompt_len: int, temperature: float, top_k: int, top_p: float):
        self.seed, self.sample_ids, self.prompt_len = seed, sample_ids, prompt_len
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        pos = input_ids.shape[1] - self.prompt_len
        tok = sample_tokens(scores, self.seed, self.sample_ids.to(scores.device), pos,
                            self.temperature, self.top_k, self.top_p)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, tok.unsqueeze(-1), 0.0)
