"""Padding-free packing of a padded LM batch into one row, for the training forward.

A micro-batch is laid out [left-padded prompt | right-padded completion], so with mixed lengths a
large share of the [B, L] grid is padding, and every projection and MLP of every layer is computed
on it. Packing keeps only the real tokens (attention_mask = 1) and concatenates them, sequence
after sequence, into one row [1, N] (N = number of real tokens). Three things keep the packed
forward equal to the padded one at every real token:

- inputs: the same token (or input embedding) at each real position;
- positions: position ids restart at 0 for every sequence and count its real tokens, which is what
  the padded forward uses (cumsum(attention_mask) - 1, i.e. `generate`'s positions);
- context: a token attends only to earlier tokens of its own sequence (`packed_attention_mask`).

Results come back to the padded grid with `unpack` (zeros at padding), so code that reads hidden
states at [B, L] positions is unchanged.

How attention is restricted depends on the backend (checked against transformers 5.23):

- flash-attention kernels (`flash_attention_2`, `flash_attention_3`): transformers reads the
  sequence boundaries from the position ids (every 0 starts a sequence) and runs the varlen kernel,
  so no mask is passed and attention costs sum_i L_i^2;
- `sdpa` / `eager`: a dense block-diagonal causal mask [1, 1, N, N] (bool for sdpa, additive float
  for eager). transformers' mask builders return a 4-D mask unchanged
  (`masking_utils._preprocess_mask_arguments`), and models whose layers mix full and sliding-window
  attention take a {layer type: mask} mapping. The attention matmuls still cost N^2 (masked blocks
  are computed and thrown away), against B * L^2 padded: packing saves the token-wise work (projections,
  MLP, norms) but, once N > sqrt(B) * L, spends more on attention than the padded batch does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# transformers attention implementations that take packed sequences from the position ids alone
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class PackedBatch:
    """The real tokens of a [B, L] batch as one row, and where each came from.

    input_ids     [1, N]  real tokens, sequence after sequence, in batch order
    position_ids  [1, N]  0, 1, ... within each sequence
    sequence_ids  [N]     the batch row of each token
    index         [N]     flat index (row * L + column) of each token in the padded grid
    lengths       [B]     real tokens per row (0 for a row that is all padding)
    shape         (B, L)  the padded grid
    """

    input_ids: Tensor
    position_ids: Tensor
    sequence_ids: Tensor
    index: Tensor
    lengths: Tensor
    shape: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return int(self.index.numel())


def pack(input_ids: Tensor, attention_mask: Tensor) -> PackedBatch:
    """Drop the padding of `input_ids` [B, L] (where attention_mask = 0) and concatenate the rest into one row."""
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"pack: input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must both be [B, L]")
    B, L = input_ids.shape
    keep = attention_mask.bool()
    index = keep.reshape(-1).nonzero().squeeze(1)
    positions = keep.long().cumsum(-1) - 1  # the padded forward's positions, exact at real tokens
    return PackedBatch(
        input_ids=input_ids.reshape(-1)[index].unsqueeze(0),
        position_ids=positions.reshape(-1)[index].unsqueeze(0),
        sequence_ids=torch.div(index, L, rounding_mode="floor"),
        index=index,
        lengths=keep.sum(-1),
        shape=(B, L),
    )


def pack_values(packed: PackedBatch, values: Tensor) -> Tensor:
    """Any [B, L, ...] tensor aligned with the padded batch (input embeddings) as the packed row [1, N, ...]."""
    B, L = packed.shape
    if tuple(values.shape[:2]) != (B, L):
        raise ValueError(f"pack_values: expected a [{B}, {L}, ...] tensor, got {tuple(values.shape)}")
    return values.reshape(B * L, *values.shape[2:])[packed.index].unsqueeze(0)


def unpack(packed: PackedBatch, values: Tensor) -> Tensor:
    """Packed results [1, N, ...] back on the padded grid [B, L, ...], zeros at padding (differentiable)."""
    B, L = packed.shape
    if values.shape[:2] != (1, packed.num_tokens):
        raise ValueError(f"unpack: expected a [1, {packed.num_tokens}, ...] tensor, got {tuple(values.shape)}")
    rest = values.shape[2:]
    flat = values.new_zeros((B * L, *rest)).index_copy(0, packed.index, values[0])
    return flat.view(B, L, *rest)


def block_causal_mask(packed: PackedBatch, dtype: torch.dtype = torch.bool,
                      sliding_window: int | None = None) -> Tensor:
    """[1, 1, N, N] mask letting each packed token attend to itself and the earlier tokens of its own sequence
    (and, with `sliding_window` w, only to the last w of them, as a sliding-window layer does).

    bool: True where attention is allowed (sdpa). A floating dtype gives the additive form: 0 where allowed,
    the dtype's most negative value elsewhere (eager attention adds the mask to the scores)."""
    seq = packed.sequence_ids
    q = torch.arange(packed.num_tokens, device=seq.device)
    allowed = (seq[:, None] == seq[None, :]) & (q[None, :] <= q[:, None])
    if sliding_window is not None:
        pos = packed.position_ids[0]
        allowed &= pos[None, :] > pos[:, None] - sliding_window
    allowed = allowed[None, None]
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=seq.device).masked_fill(~allowed, torch.finfo(dtype).min)


def packed_attention_mask(packed: PackedBatch, config, dtype: torch.dtype) -> Tensor | dict[str, Tensor] | None:
    """The `attention_mask` argument that confines attention to each sequence of the packed row, for a
    transformers model with `config` running its activations in `dtype`:

    None for flash-attention backends (the position ids say where sequences start); otherwise the dense
    block-causal mask, as a {layer type: mask} mapping when the model has sliding-window layers.
    """
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl in VARLEN_ATTENTION:
        return None
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"train.packed_sequences: attention implementation {impl!r} is not supported for packed "
                         f"sequences; use sdpa, eager or {' / '.join(VARLEN_ATTENTION)}")
    mask_dtype = torch.bool if impl == "sdpa" else dtype
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types == {"full_attention"}:
        return block_causal_mask(packed, mask_dtype)
    unknown = layer_types - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"train.packed_sequences: layers of type {sorted(unknown)} cannot be packed with a dense mask; "
                         f"use {' / '.join(VARLEN_ATTENTION)} or turn packing off")
    masks = {"full_attention": block_causal_mask(packed, mask_dtype)}
    if "sliding_attention" in layer_types:
        masks["sliding_attention"] = block_causal_mask(packed, mask_dtype, config.sliding_window)
    return masks
