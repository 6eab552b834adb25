"""The embedded tiny VLM: a real Qwen2-VL (or Qwen2.5-VL) architecture, tokenizer and processor built offline.

The tokenizer is word level (built with the `tokenizers` library): Qwen's special tokens
(`<|im_start|>`, `<|vision_start|>`, `<|image_pad|>`, ...), the `<think>`/`<answer>` tags, every word of
the task's prompts, single digits and punctuation. The processor is the real `Qwen2VLProcessor` (or
`Qwen2_5_VLProcessor`) with the real image processor (14-pixel patches, 2x2 merge, smart_resize to
multiples of 28) and a chat template in Qwen's format, so `rlft` runs the same code on the embedded
model as on a downloaded checkpoint, and both round-trip through `save_pretrained`/`from_pretrained`.
"""

from __future__ import annotations

import re

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
PRETOKENIZE = r"<\|[a-z_]+\|>|</?(?:think|answer)>|[A-Za-z]+|[0-9]|\s|[^\sA-Za-z0-9]"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(corpus: list[str], phrases: list[str] = ()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose vocabulary covers `corpus` (prompts and answers), digits and ASCII punctuation.

    `phrases` (the constant pieces of the task's prompts and answer format) become single tokens, so a
    300-word prompt costs a handful of positions on a CPU; the text itself is unchanged.
    """
    words = set("0123456789") | {chr(c) for c in range(33, 127) if not chr(c).isalnum()} | {" ", "\n"}
    words |= {"user", "assistant", "system", "<think>", "</think>", "<answer>", "</answer>"}
    for text in corpus:
        words |= {w for w in re.findall(PRETOKENIZE, text) if w not in SPECIAL}
    vocab = {t: i for i, t in enumerate(SPECIAL + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKENIZE), "isolated")
    tok.decoder = decoders.Fuse()
    # longest first, ties by text: ids must not depend on set order (string hashing differs per process)
    ordered = sorted({p for p in phrases if p}, key=lambda p: (-len(p), p))
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in ordered])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        chat_template=CHAT_TEMPLATE)


def build_processor(tokenizer, family: str = "qwen2_vl", min_pixels: int = 3136, max_pixels: int = 401408):
    """The library's own processor class for the family, around the in-process tokenizer."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    kw = dict(image_processor=Qwen2VLImageProcessor(size=size), tokenizer=tokenizer,
              video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor

        return Qwen2_5_VLProcessor(**kw)
    from transformers import Qwen2VLProcessor

    return Qwen2VLProcessor(**kw)


def build_model(tokenizer, family: str = "qwen2_vl", hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                vision_depth: int = 2, vision_dim: int = 64, max_positions: int = 1024):
    """A freshly initialised tiny Qwen2-VL / Qwen2.5-VL (head_dim = hidden/heads; M-RoPE sections sum to head_dim/2)."""
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    t = half // 4
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                max_position_embeddings=max_positions, rope_scaling={"type": "mrope", "mrope_section": mrope},
                tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=None)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = dict(depth=vision_depth, hidden_size=vision_dim, intermediate_size=vision_dim * 2, num_heads=4,
                      out_hidden_size=hidden_size, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=56, fullatt_block_indexes=[vision_depth - 1])
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
        return Qwen2_5_VLForConditionalGeneration(cfg)
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden_size, num_heads=4, mlp_ratio=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    return Qwen2VLForConditionalGeneration(cfg)
