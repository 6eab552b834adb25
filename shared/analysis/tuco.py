"""Tuning Contribution (TuCo): how much of a fine-tuned model's forward pass the fine-tuning accounts for.

"How Much Does Fine-Tuning Change a Model? Tuning Contribution" (arXiv 2506.23423, ICML 2025),
Algorithm 1; METHODS.md B.18. For a base (PT) and a fine-tuned (FT) model of the same architecture,
run the fine-tuned residual stream layer by layer and split each layer's update into the part the
base layer would have made and the rest:

    x_0      = E_FT(input_ids)                           (fine-tuned embeddings)
    PTC_l    = f^PT_l(x_l) − x_l                         (base layer l on the same input)
    FTC_l    = f^FT_l(x_l) − x_l − PTC_l                 (fine-tuning component)
    x_{l+1}  = x_l + PTC_l + FTC_l  (= f^FT_l(x_l))
    I_PT = Σ_l PTC_l[last token],  I_FT = Σ_l FTC_l[last token]
    TuCo = ‖I_FT‖₂ / (‖I_PT‖₂ + ‖I_FT‖₂)  ∈ [0, 1]

f_l(x) here is the whole decoder block (attention and MLP with their residual adds), so
f_l(x) − x is the block's residual update. x_L is the residual stream before the final norm. The
paper's steering variant (scaling FTC) is not implemented.

Supports Qwen2-family (and Llama-like) transformers models whose decoder is `model.base_model` with
`embed_tokens`, `layers`, `rotary_emb`, `norm` and `config.layer_types`, called the way
`Qwen2Model.forward` calls its layers in transformers 5 (rotary position embeddings and a causal
mask built by `transformers.masking_utils` for the model's attention implementation). Prompts are
single and unpadded: positions 0..L−1.

    from shared.analysis.tuco import tuco_batch
    ids = [tokenizer(p, return_tensors="pt")["input_ids"] for p in prompts]
    print(tuco_batch(base_model, rl_model, ids)["tuco"])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from shared.analysis.divergence import eval_mode, hf_model
from shared.hf_compat import CACHE_KWARG


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (Qwen2Model) of a causal LM, through a peft wrapper if there is one."""
    return hf_model(model).base_model


def _layer_kwargs(decoder: nn.Module, x: Tensor, position_ids: Tensor) -> list[dict]:
    """Per-layer keyword arguments, as `Qwen2Model.forward` passes them (no cache, no padding)."""
    cfg = decoder.config
    mask_kwargs = {"config": cfg, "inputs_embeds": x, "attention_mask": None, CACHE_KWARG: None,
                   "position_ids": position_ids}
    masks = {"full_attention": create_causal_mask(**mask_kwargs)}
    if "sliding_attention" in cfg.layer_types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
    rope = decoder.rotary_emb(x, position_ids)
    return [{"attention_mask": masks[cfg.layer_types[i]], "position_embeddings": rope, "position_ids": position_ids,
             CACHE_KWARG: None, "use_cache": False} for i in range(len(decoder.layers))]


@torch.no_grad()
def decompose(base: nn.Module, tuned: nn.Module, input_ids: Tensor) -> dict:
    """Algorithm 1's per-layer split on one prompt [1, L]: {"ptc": [PTC_l], "ftc": [FTC_l]} (each
    [1, L, H]) and "final_hidden" x_L [1, L, H] (the fine-tuned residual stream before the final norm)."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise ValueError(f"tuco: one unpadded prompt [1, L] at a time, got shape {tuple(input_ids.shape)}; "
                         "use tuco_batch for several")
    dec_pt, dec_ft = _decoder(base), _decoder(tuned)
    if len(dec_pt.layers) != len(dec_ft.layers) or dec_pt.config.hidden_size != dec_ft.config.hidden_size:
        raise ValueError(f"tuco: base and fine-tuned models differ in architecture ({len(dec_pt.layers)} vs "
                         f"{len(dec_ft.layers)} layers, hidden {dec_pt.config.hidden_size} vs "
                         f"{dec_ft.config.hidden_size}); TuCo compares two checkpoints of one architecture")
    with eval_mode(base, tuned):
        x = dec_ft.embed_tokens(input_ids.to(dec_ft.embed_tokens.weight.device))  # x_0
        position_ids = torch.arange(x.shape[1], device=x.device)[None]
        kw_ft, kw_pt = _layer_kwargs(dec_ft, x, position_ids), _layer_kwargs(dec_pt, x, position_ids)
        ptcs, ftcs = [], []
        for layer_ft, layer_pt, k_ft, k_pt in zip(dec_ft.layers, dec_pt.layers, kw_ft, kw_pt):
            ptc = layer_pt(x, **k_pt) - x             # f^PT_l(x_l) − x_l
            ftc = layer_ft(x, **k_ft) - x - ptc       # f^FT_l(x_l) − x_l − PTC_l
            x = x + ptc + ftc                         # x_{l+1}
            ptcs.append(ptc)
            ftcs.append(ftc)
    return {"ptc": ptcs, "ftc": ftcs, "final_hidden": x}


def tuco(base: nn.Module, tuned: nn.Module, input_ids: Tensor) -> dict:
    """TuCo of one prompt [1, L]: {"tuco", "norm_ft" = ‖I_FT‖, "norm_pt" = ‖I_PT‖, "per_layer_ft_norm":
    [‖FTC_l[last]‖ per layer], "per_layer_pt_norm": [‖PTC_l[last]‖ per layer]} (norms in float32;
    tuco is 0 when both norms are 0)."""
    parts = decompose(base, tuned, input_ids)
    ftc = [f[0, -1].float() for f in parts["ftc"]]
    ptc = [p[0, -1].float() for p in parts["ptc"]]
    norm_ft, norm_pt = float(torch.stack(ftc).sum(0).norm()), float(torch.stack(ptc).sum(0).norm())
    total = norm_ft + norm_pt
    return {"tuco": norm_ft / total if total > 0 else 0.0, "norm_ft": norm_ft, "norm_pt": norm_pt,
            "per_layer_ft_norm": [float(f.norm()) for f in ftc], "per_layer_pt_norm": [float(p.norm()) for p in ptc]}


def tuco_batch(base: nn.Module, tuned: nn.Module, prompts_ids: list[Tensor]) -> dict:
    """TuCo over prompts (each [L] or [1, L], unpadded), one at a time: the means of "tuco", "norm_ft"
    and "norm_pt", and "per_prompt" (each prompt's TuCo)."""
    if not prompts_ids:
        raise ValueError("tuco_batch: no prompts given")
    results = [tuco(base, tuned, ids) for ids in prompts_ids]
    mean = lambda key: sum(r[key] for r in results) / len(results)
    return {"tuco": mean("tuco"), "norm_ft": mean("norm_ft"), "norm_pt": mean("norm_pt"),
            "per_prompt": [r["tuco"] for r in results]}
