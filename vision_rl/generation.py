"""Group rollout for Qwen2-VL / Qwen2.5-VL: the vision tower and the prompt prefill run once per prompt.

GRPO-style rollout draws n samples per prompt. Repeating each prompt's inputs n times and calling
`generate` runs the vision tower and the prefill of the whole prompt (image tokens included) n times
for identical inputs. `generate_shared_prefill` instead:

1. runs `generate` on the P distinct prompts for ONE token, with a logits processor that records that
   step's scores (after generate's own processors: suppressed tokens, anything the model's generation
   config adds) and with the KV cache returned: the vision tower and the prefill run once per prompt,
   through the library's own code (M-RoPE position ids, `rope_deltas`);
2. repeats the cache, the model's `rope_deltas` and the first-step scores n times along the batch
   (`repeat_interleave`, prompt-major like the per-sample path) and picks each sample's first token
   from them with the caller's logits processors (counter-based sampling keys the noise by sample id
   and position, so the n samples of a prompt differ);
3. continues with `generate` from [prompt | first token] and the expanded cache: generate feeds only the
   uncached first token, and takes the 3D positions of the new tokens from the expanded `rope_deltas`
   (the library's path for continuing from a cache).

The first token is taken from the prefill logits, not recomputed, because `generate` cannot start from
a cache that holds the whole prompt (it needs at least one uncached token), and prefilling all but
the last prompt token would change the arithmetic of the first step. Every forward pass therefore has
the same shapes per row as in the per-sample path, so with counter-based sampling the sequences are
the same (the tests check token-for-token equality).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from shared.hf_compat import CACHE_KWARG, returned_cache


class _RecordScores:
    """Logits processor that keeps a copy of the scores it is given and returns them unchanged."""

    def __init__(self):
        self.scores: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.scores = scores.clone()
        return scores


class _CompletionHasEOS(StoppingCriteria):
    """Rows whose completion (tokens after `prompt_len`) holds an EOS are finished.

    generate's own EOS criterion looks at the last token only; it would not see an EOS that was picked
    as the first token before generate took over, and such a row would run on to max_new_tokens."""

    def __init__(self, prompt_len: int, eos_ids: list[int]):
        self.prompt_len, self.eos_ids = prompt_len, eos_ids

    def __call__(self, input_ids: Tensor, scores, **kwargs) -> Tensor:
        eos = torch.tensor(self.eos_ids, device=input_ids.device)
        return torch.isin(input_ids[:, self.prompt_len:], eos).any(-1)


@torch.no_grad()
def generate_shared_prefill(model: nn.Module, inputs: dict[str, Tensor], n: int, generation_config: GenerationConfig,
                            logits_processor: LogitsProcessorList) -> Tensor:
    """Sequences [n*P, Lp + T] equal to `model.generate(**repeated, generation_config, logits_processor)` where
    `repeated` has each of the P prompts of `inputs` n times in a row (prompt-major).

    `inputs`: the model's generate inputs for P left-padded prompts (input_ids, attention_mask, mm_token_type_ids,
    pixel_values [all patches of the P images], image_grid_thw). `generation_config` must be greedy
    (do_sample=False): the sampling, if any, is done by `logits_processor` (shared.sampling's counter-based
    processor, built for the n*P sample ids and prompt length Lp), so it picks the same tokens whatever runs
    the step. After EOS a row holds pad tokens, as with generate; T is the longest completion.
    """
    if generation_config.do_sample:
        raise ValueError("generate_shared_prefill needs do_sample=False: sampling must come from the logits "
                         "processors (counter-based sampling), so that repeated first-step scores give distinct samples")
    eos_ids = generation_config.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    if not eos_ids or generation_config.pad_token_id is None or not generation_config.max_new_tokens:
        raise ValueError("generate_shared_prefill needs eos_token_id, pad_token_id and max_new_tokens (>= 1) in the "
                         "generation config")
    core = model.model  # Qwen2VLModel / Qwen2_5_VLModel: holds the M-RoPE `rope_deltas` of the last prefill
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    Lp = ids.shape[1]

    # 1. one prefill per prompt (vision tower included); keep the first step's scores and the cache
    record = _RecordScores()
    first_cfg = copy.deepcopy(generation_config)
    first_cfg.max_new_tokens, first_cfg.return_dict_in_generate = 1, True
    first_cfg.output_scores = first_cfg.output_logits = False
    out = model.generate(**inputs, generation_config=first_cfg, logits_processor=LogitsProcessorList([record]))
    cache = returned_cache(out)
    if cache is None or cache.get_seq_length() != Lp or core.rope_deltas is None:
        raise RuntimeError(f"{type(model).__name__}.generate did not return the prompt's KV cache ({Lp} positions) "
                           "and M-RoPE rope_deltas: the shared-prefill rollout does not support this model")

    # 2. expand to the n samples of each prompt; each sample picks its own first token
    cache.batch_repeat_interleave(n)
    core.rope_deltas = core.rope_deltas.repeat_interleave(n, 0)
    ids = ids.repeat_interleave(n, 0)
    first = logits_processor(ids, record.scores.repeat_interleave(n, 0)).argmax(-1, keepdim=True)
    seq = torch.cat([ids, first], 1)
    if generation_config.max_new_tokens <= 1:
        return seq

    # 3. decode the n*P samples from [prompt | first token] and the expanded cache
    rest_cfg = copy.deepcopy(generation_config)
    rest_cfg.max_new_tokens = generation_config.max_new_tokens - 1
    rest_cfg.return_dict_in_generate = False
    mm = inputs["mm_token_type_ids"].repeat_interleave(n, 0)
    out = model.generate(input_ids=seq, attention_mask=torch.cat([mask.repeat_interleave(n, 0), mask.new_ones(len(seq), 1)], 1),
                         mm_token_type_ids=torch.cat([mm, mm.new_zeros(len(seq), 1)], 1), **{CACHE_KWARG: cache},
                         generation_config=rest_cfg, logits_processor=logits_processor,
                         stopping_criteria=StoppingCriteriaList([_CompletionHasEOS(Lp, eos_ids)]))

    # a row that picked EOS first still ran one step in generate: pad after the first EOS and drop the
    # columns no row needs, so the result is what the per-sample generate returns
    comp = out[:, Lp:]
    is_eos = torch.isin(comp, torch.tensor(eos_ids, device=comp.device)).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    comp = comp.masked_fill(after_eos, generation_config.pad_token_id)
    width = int((~after_eos).sum(-1).max())
    return torch.cat([out[:, :Lp], comp[:, :width]], 1)
