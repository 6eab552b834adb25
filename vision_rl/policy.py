"""VLM policy over Qwen2-VL / Qwen2.5-VL (`AutoModelForImageTextToText` + `AutoProcessor`).

The text side is the causal-LM policy of llm_rl (left-padded prompt | right-padded completion,
counter-based batch-invariant sampling, chunked log-probs from hidden states); this module adds the
image inputs:

- each row's message ({"image": PIL image or path, min/max_pixels} + the prompt) goes through
  `qwen_vl_utils.process_vision_info` (smart_resize to multiples of 28 within [min_pixels, max_pixels])
  and the model's processor ONCE per prompt; the group of G samples reuses those pixel tensors;
- rollout with G > 1 runs the vision tower and the prompt prefill once per prompt and decodes the G samples
  from the shared KV cache (vision_rl/generation.py): the same tokens as generating from G copies of the
  prompt, without G-fold vision and prefill compute (`share_prefill=False` restores the per-sample path);
- rollout inputs keep, per sample, `pixel_values` [B, N_patches, D] (zero-padded), `image_grid_thw`
  [B, 3], `mm_token_type_ids` [B, L] and an `image_key` [B] naming the distinct image;
- log-probs run the vision tower once per DISTINCT image of a micro-batch (`image_key`) and hand the
  features to the language model through `mm_encoder_outputs`, with the same M-RoPE position ids the
  model computes in `generate` (so stored and recomputed log-probs agree);
- image placeholder tokens are never sampled (`suppress_tokens`), and log-probs are taken under that
  same distribution (those logits get -1e9), so stored and recomputed log-probs stay equal;
- a prompt longer than `max_prompt_length` tokens is an error naming the row: prompts with images
  are never truncated (truncation splits image tokens from image features).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llm_rl.policy import CausalLMPolicy, LMForward, hf_model
from vision_rl.generation import generate_shared_prefill


class VLMForward(LMForward):
    """forward(input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw, image_key, mask)."""

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, mm_token_type_ids: Tensor = None,
                      pixel_values: Tensor = None, image_grid_thw: Tensor = None, image_key: Tensor = None) -> Tensor:
        core = hf_model(self.model).model  # Qwen2VLModel / Qwen2_5_VLModel
        keys = image_key.tolist()
        first: dict[int, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        uniq = list(first.values())
        slot = {k: j for j, k in enumerate(first)}
        n_patches = image_grid_thw.prod(-1).tolist()
        pv = torch.cat([pixel_values[i, : n_patches[i]] for i in uniq])
        train_vision = any(p.requires_grad for p in core.visual.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and train_vision):
            feats = core.get_image_features(pv, image_grid_thw[uniq], return_dict=True)
        per_image = feats.pooler_output
        feats.pooler_output = tuple(per_image[slot[k]] for k in keys)  # one entry per sample, in batch order
        out = core(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                   image_grid_thw=image_grid_thw, mm_encoder_outputs={"image": feats}, use_cache=False)
        return out.last_hidden_state


class VLMPolicy(CausalLMPolicy):
    """Implements the Policy contract (shared/policy.py) for image + text prompts."""

    def __init__(self, model: nn.Module, processor, min_pixels: int = 3136, max_pixels: int = 401408,
                 max_prompt_length: int = 2048, share_prefill: bool = True, **kw):
        super().__init__(model, processor.tokenizer, **kw)
        self.share_prefill = share_prefill  # n > 1: one vision + prefill pass per prompt (False: per sample)
        self.module = VLMForward(model, self.temperature, self.module.chunk_size,
                                 logprob_backend=self.module.logprob_backend)
        self.processor = processor
        self.min_pixels, self.max_pixels, self.max_prompt_length = min_pixels, max_pixels, max_prompt_length
        self.processor_calls = 0  # prompts encoded so far (tests check one call per prompt, not per sample)
        self._next_key = 0
        cfg = getattr(model, "config", None)
        self.suppress_ids = [i for i in (getattr(cfg, k, None) for k in (
            "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")) if i is not None]
        self.module.suppress_ids = self.suppress_ids

    def messages(self, row: dict) -> list[dict]:
        image = {"type": "image", "image": row["image"], "min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": [image, {"type": "text", "text": row["prompt"]}]}]

    def encode_rows(self, rows: list[dict], device) -> dict[str, Tensor]:
        from qwen_vl_utils import process_vision_info

        msgs = [self.messages(r) for r in rows]
        texts = [self.processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
        images = process_vision_info(msgs)[0]
        size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        enc = self.processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt",
                             images_kwargs={"size": size})
        self.processor_calls += len(rows)
        lengths = enc["attention_mask"].sum(-1).tolist()
        for r, n in zip(rows, lengths):
            if n > self.max_prompt_length:
                raise ValueError(f"row image_id={r.get('image_id')}: the prompt has {n} tokens (image included) > "
                                 f"task.max_prompt_length={self.max_prompt_length}; prompts with images are never "
                                 "truncated: lower task.max_pixels or raise task.max_prompt_length")
        grid = enc["image_grid_thw"]
        sizes = grid.prod(-1).tolist()
        chunks = torch.split(enc["pixel_values"], sizes)
        pv = enc["pixel_values"].new_zeros(len(rows), max(sizes), enc["pixel_values"].shape[-1])
        for i, c in enumerate(chunks):
            pv[i, : len(c)] = c
        keys = torch.arange(self._next_key, self._next_key + len(rows))
        self._next_key += len(rows)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
               "mm_token_type_ids": enc["mm_token_type_ids"], "pixel_values": pv, "image_grid_thw": grid,
               "image_key": keys}
        return {k: v.to(device) for k, v in out.items()}

    def append_completion(self, prompt: dict[str, Tensor], completion: Tensor, mask: Tensor) -> dict[str, Tensor]:
        out = super().append_completion(prompt, completion, mask)
        out["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion)], 1)
        return out

    def generation_inputs(self, prompt: dict[str, Tensor]) -> dict[str, Tensor]:
        sizes = prompt["image_grid_thw"].prod(-1).tolist()
        pv = torch.cat([prompt["pixel_values"][i, :n] for i, n in enumerate(sizes)])
        return {"input_ids": prompt["input_ids"], "attention_mask": prompt["attention_mask"],
                "mm_token_type_ids": prompt["mm_token_type_ids"], "pixel_values": pv,
                "image_grid_thw": prompt["image_grid_thw"]}

    @torch.no_grad()
    def generate(self, rows: list[dict], n: int = 1, seed: int | None = None, first_sample_id: int = 0,
                 max_new_tokens: int | None = None) -> tuple[dict[str, Tensor], Tensor, list[str], dict]:
        """n completions per row, as CausalLMPolicy.generate (same tokens, same rollout inputs); with n > 1 and
        `share_prefill` the vision tower and the prompt prefill run once per row, not once per sample."""
        if n == 1 or not self.share_prefill:
            return super().generate(rows, n, seed, first_sample_id, max_new_tokens)
        device = next(self.module.parameters()).device
        enc = self.encode_rows(rows, device)
        p = {k: v.repeat_interleave(n, 0) for k, v in enc.items()}  # the rollout stores per-sample inputs

        def share(model, gen_cfg, procs):  # one prefill per row, expanded to its n samples
            return generate_shared_prefill(model, self.generation_inputs(enc), n, gen_cfg, procs)

        comp, mask, texts, stats = self._generate(p, seed, first_sample_id, max_new_tokens or self.max_new_tokens,
                                                  run=share)
        return self.append_completion(p, comp, mask), mask, texts, stats

    def save_pretrained(self, path) -> None:
        self.unwrap(self.module).model.save_pretrained(path, safe_serialization=True)
        self.processor.save_pretrained(path)
