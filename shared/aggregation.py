"""Loss aggregation over tokens and sequences: the one option `algorithm.loss_agg`.

| mode                      | loss                                         | equals                     |
|---------------------------|----------------------------------------------|----------------------------|
| `token_mean`              | sum_{i,t} l*m / sum_{i,t} m                  | DAPO, verl default, TRL dapo |
| `seq_mean_token_mean`     | mean_i( sum_t l*m / |o_i| )                  | original GRPO              |
| `seq_mean_token_sum`      | mean_i( sum_t l*m )                          |                            |
| `seq_mean_token_sum_norm` | mean_i( sum_t l*m ) / L_const                | Dr. GRPO                   |

Every mode is a weighted sum  sum_{i,t} w_{i,t} * l_{i,t}  whose weights use counts of the WHOLE
optimizer step (all micro-batches on all processes): `StepNorm`. Summing the per-micro-batch values
therefore gives exactly the full-batch loss, whatever the micro-batch size, accumulation steps or
process count. (Dividing by the local micro-batch count instead is a recurring bug elsewhere.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


@dataclass(frozen=True)
class StepNorm:
    """Counts over one optimizer step, all micro-batches and processes together."""

    num_tokens: float  # sum of the mask
    num_seqs: float  # sequences with at least one unmasked position
    norm_len: float = 1.0  # L_const for seq_mean_token_sum_norm

    @staticmethod
    def of(mask: Tensor, norm_len: float = 1.0) -> "StepNorm":
        """Counts of a batch that is the whole optimizer step (single process, no split)."""
        return StepNorm(float(mask.sum()), float((mask.sum(-1) > 0).sum()), float(norm_len))


def token_weights(mask: Tensor, mode: str, norm: StepNorm, dtype: torch.dtype = torch.float32) -> Tensor:
    """w[i,t] such that the aggregated loss is (w * l).sum(). Zero where mask is zero."""
    mask = mask.to(dtype)
    if mode == "token_mean":
        return mask / max(norm.num_tokens, 1.0)
    per_seq = mask / max(norm.num_seqs, 1.0)
    if mode == "seq_mean_token_mean":
        return per_seq / mask.sum(-1, keepdim=True).clamp(min=1.0)
    if mode == "seq_mean_token_sum":
        return per_seq
    if mode == "seq_mean_token_sum_norm":
        return per_seq / norm.norm_len
    raise ValueError(f"unknown loss_agg {mode!r}; choose one of {', '.join(LOSS_AGG_MODES)}")


def aggregate(values: Tensor, mask: Tensor, mode: str, norm: StepNorm) -> Tensor:
    """Aggregate per-token values [B, T] into this micro-batch's share of the step's scalar."""
    dtype = values.dtype if values.is_floating_point() and values.dtype != torch.bfloat16 else torch.float32
    return (values * token_weights(mask, mode, norm, dtype)).sum()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Plain token mean over the mask of this batch (for metrics)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)
