"""Shared-prompt training forward: each distinct prompt of a micro-batch runs through the decoder once.

A GRPO-style rollout holds G completions of every prompt, laid out [left-padded prompt | right-padded
completion]. The padded forward recomputes the prompt in every one of the G rows, so when prompts are
longer than completions most of the forward and backward work is repeated prompt tokens (64% of the
positions in benchmarks/bench_grpo_step.py). The shared-prompt forward (config `train.shared_prompt`)

1. groups the rows of the micro-batch by prompt (`prompt_groups`): rows whose prompt columns hold the same
   real tokens in the same left-padded layout. Group ids are not used and rows of one prompt need not be
   contiguous; a micro-batch may hold part of a group, or a prompt once;
2. runs the decoder once on the U distinct prompts [U, P], with gradient, keeping their KV cache
   (transformers' `DynamicCache`);
3. indexes the cache to the B rows (row b reads its prompt's keys and values). The index is differentiable:
   its backward sums the gradients of all the completions of a prompt into the one prompt computation;
4. runs the completion tokens [B, T] against that cache with the full attention mask [prompt | completion]
   and the padded forward's position ids, cumsum(attention_mask) - 1, which continue from each prompt's
   real length;
5. returns hidden states on the padded grid [B, P + T, H]: prompt columns from the prompt pass (row b gets its
   prompt's), completion columns from the completion pass. `completion_log_probs` reads hidden[:, -T-1:-1], so
   the first completion token is predicted from the prompt pass's last column, as in the padded forward.

Every real position sees the same tokens, positions and context as in the padded forward, so log-probs,
entropies and gradients agree to float rounding (tests/llm_rl/test_shared_prompt.py). The decoder runs on
U * P + B * T positions instead of B * (P + T); the attention of a completion token still spans its
P + T keys. With one sample per prompt (U = B) it does the padded forward's work in two passes.

Limits, each refused with a one-line error: the text-only LMForward (a VLM's prompts carry images and M-RoPE
positions); full- and sliding-window-attention layers only (not linear-attention or other cached states); not
under activation checkpointing (transformers' checkpointed layers drop the KV cache); not together with
`train.packed_sequences` (the config rejects both).

    rlft train configs/llm/arithmetic_grpo.yaml train.shared_prompt=true
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from shared.hf_compat import CACHE_KWARG

# decoder layer types whose KV cache continues a left-padded prompt exactly (sliding-window caches keep the last
# window of keys, and the mask is built from the same absolute columns as in the padded forward)
SUPPORTED_LAYERS = {"full_attention", "sliding_attention"}


@dataclass(frozen=True)
class PromptGroups:
    """Rows of a [B, P + T] micro-batch grouped by identical prompts (the first P columns).

    first    [U]  the row that represents each distinct prompt (its first row in the batch)
    inverse  [B]  the distinct prompt of each row (an index into `first`)
    """

    first: Tensor
    inverse: Tensor

    @property
    def num_prompts(self) -> int:
        return int(self.first.numel())


def prompt_groups(input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> PromptGroups:
    """Group the rows whose first `prompt_len` columns are the same prompt: equal tokens where
    attention_mask = 1 and padding in the same places (the token under padding does not matter)."""
    B = input_ids.shape[0]
    key = input_ids[:, :prompt_len].masked_fill(attention_mask[:, :prompt_len] == 0, -1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    U = int(inverse.max()) + 1 if B else 0
    rows = torch.arange(B, device=input_ids.device)
    first = torch.full((U,), B, dtype=torch.long, device=input_ids.device).scatter_reduce(0, inverse, rows, "amin")
    return PromptGroups(first=first, inverse=inverse)


def check_decoder(decoder: nn.Module) -> None:
    """ValueError (one line) when `decoder` (a transformers base model) cannot run the shared-prompt forward."""
    unknown = set(getattr(decoder.config, "layer_types", None) or []) - SUPPORTED_LAYERS
    if unknown:
        raise ValueError(f"train.shared_prompt: layers of type {sorted(unknown)} are not supported (only "
                         f"{' / '.join(sorted(SUPPORTED_LAYERS))}); set train.shared_prompt: false")
    if decoder.training and any(getattr(m, "gradient_checkpointing", False) for m in decoder.modules()):
        raise ValueError("train.shared_prompt: activation checkpointing (model.gradient_checkpointing) drops the "
                         "prompt's KV cache; turn one of them off")


def shared_prompt_hidden_states(decoder: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_len: int,
                                inputs_embeds: Tensor | None = None) -> Tensor:
    """Last hidden states [B, P + T, H] of the padded forward, with each distinct prompt computed once.

    decoder         the transformers base model (e.g. Qwen2Model: embeddings + layers + final norm)
    input_ids       [B, P + T] left-padded prompts then right-padded completions (T = `completion_len`)
    attention_mask  [B, P + T]
    inputs_embeds   optional [B, P + T, H] input embeddings instead of token ids (IFT's residual forward);
                    their prompt columns must be a function of the prompt tokens, as the token embeddings are
    """
    check_decoder(decoder)
    P = input_ids.shape[1] - completion_len
    groups = prompt_groups(input_ids, attention_mask, P)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # `generate`'s, as in the padded forward
    first = groups.first
    if inputs_embeds is None:
        prompt_in = {"input_ids": input_ids[first, :P]}
        completion_in = {"input_ids": input_ids[:, P:]}
    else:
        prompt_in = {"inputs_embeds": inputs_embeds[first, :P]}
        completion_in = {"inputs_embeds": inputs_embeds[:, P:]}

    cache = DynamicCache(config=decoder.config)
    prompt = decoder(**prompt_in, attention_mask=attention_mask[first, :P], position_ids=positions[first, :P],
                     use_cache=True, **{CACHE_KWARG: cache})
    cache.batch_select_indices(groups.inverse)  # [U, heads, P, d] -> [B, heads, P, d] in every layer
    completion = decoder(**completion_in, attention_mask=attention_mask, position_ids=positions[:, P:],
                         use_cache=True, **{CACHE_KWARG: cache})
    return torch.cat([prompt.last_hidden_state[groups.inverse], completion.last_hidden_state], 1)
