"""Per-token log-probabilities of chosen tokens without a full-vocabulary fp32 log-softmax.

`selective_log_probs(hidden, weight, targets)` computes log softmax(hidden @ W^T / T)[target] and
the entropy of that distribution, a chunk of positions at a time. Each chunk runs under activation
checkpointing, so neither the forward nor the backward holds more than one chunk's [chunk, V]
logits: peak memory is O(chunk * V) instead of O(N * V). `reference_log_probs` is the plain
log_softmax + gather twin used by the tests.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _chunk_logp(h: Tensor, weight: Tensor, bias: Tensor | None, tgt: Tensor, temperature: float,
                with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-prob of `tgt` (and, without grad, the entropy) from ONE logits matmul for this chunk."""
    logits = torch.nn.functional.linear(h, weight, bias).float() / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    with torch.no_grad():  # H = lse - sum_v p_v * z_v
        ent = lse.detach() - (torch.softmax(logits.detach(), -1) * logits.detach()).sum(-1)
    return logp, ent


def selective_log_probs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    bias: Tensor | None = None,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """hidden [N, H], weight [V, H], targets [N] -> (logp [N] fp32, entropy [N] fp32 or None)."""
    logps, ents = [], []
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s : s + chunk_size], targets[s : s + chunk_size]
        if grad:
            lp, ent = checkpoint(_chunk_logp, h, weight, bias, t, temperature, with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_logp(h, weight, bias, t, temperature, with_entropy)
        logps.append(lp)
        if with_entropy:
            ents.append(ent)
    empty = hidden.new_zeros(0, dtype=torch.float32)
    logp = torch.cat(logps) if logps else empty
    ent = (torch.cat(ents) if ents else empty) if with_entropy else None
    return logp, ent


def reference_log_probs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Plain twin: log_softmax over the full vocabulary, then gather."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
