"""Token-level Jensen-Shannon divergence between two causal LMs, and the cross-sampling intervention.

"Sparse-but-Critical" (arXiv 2603.22446), METHODS.md B.17 [APPROX]. The paper measures, at every
response position t, JS(π_RL(·|s_t) ‖ π_base(·|s_t)) on the same teacher-forced states s_t and finds
that only a few positions carry most of the divergence, concentrated near the start and end of the
response. Cross-sampling tests whether those positions matter: decode greedily with one model and
take the other model's token only at the chosen positions.

| function            | what it gives                                                                  |
|---------------------|--------------------------------------------------------------------------------|
| `js_divergence`     | JS(p ‖ q) = ½ KL(p ‖ m) + ½ KL(q ‖ m), m = (p + q)/2, natural log, ∈ [0, ln 2]  |
| `token_js`          | JS [B, T] between two models' next-token distributions at completion positions |
| `js_profile`        | mean, sparsity (top-fraction share) and relative-position histogram of a JS map |
| `top_js_positions`  | bool [B, T]: each row's top `top_frac` masked positions by JS                   |
| `cross_sample`      | greedy decoding with model A, switching to model B's greedy token where asked   |

Sequences follow llm_rl/policy.py: [left-padded prompt | right-padded completion], `mask` [B, T]
marks the completion tokens, position ids come from the attention mask. The hidden state at
position p predicts token p + 1.

Run it on a base and an RL checkpoint::

    batch = policy.sample(rows, n=1, seed=0, first_sample_id=0, first_group_id=0)
    js = token_js(base_model, rl_model, batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.mask)
    print(js_profile(js, batch.mask))
    texts = cross_sample(base_model, rl_model, tokenizer, prompt_ids, prompt_mask,
                         top_js_positions(js, batch.mask, 0.05), max_new_tokens=64)
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

LN2 = math.log(2.0)


def js_divergence(logp: Tensor, logq: Tensor) -> Tensor:
    """JS(p ‖ q) over the last dim from log-probs (natural log), shape = logp.shape[:-1].

    log m = logsumexp(log p, log q) − ln 2, so no probability is formed before the log; entries with
    p_v = 0 (log p_v = −inf) contribute 0 (0·log 0 = 0). Computed in at least float32, clamped at 0
    against rounding (identical inputs give ~1e-8, not exactly 0).
    """
    dtype = torch.promote_types(logp.dtype, torch.float32)
    logp, logq = logp.to(dtype), logq.to(dtype)
    logm = torch.logaddexp(logp, logq) - LN2

    def kl_to_m(logx: Tensor) -> Tensor:
        x = logx.exp()
        diff = torch.where(x > 0, logx - logm, torch.zeros_like(logx))  # masks −inf − (−inf) = nan too
        return (x * diff).sum(-1)

    return (0.5 * kl_to_m(logp) + 0.5 * kl_to_m(logq)).clamp(min=0.0)


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (adapters stay active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Eval mode (no dropout) for the duration, restoring each model's previous mode."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _last_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final (normed) decoder hidden states [B, L, H], position ids from the attention mask."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = hf_model(model).base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False)
    return out.last_hidden_state


def _head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    head = hf_model(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


@torch.no_grad()
def token_js(model_a: nn.Module, model_b: nn.Module, input_ids: Tensor, attention_mask: Tensor, mask: Tensor,
             temperature: float = 1.0, chunk_size: int = 256) -> Tensor:
    """JS [B, T] (float32) between the two models' next-token distributions (logits / temperature) at
    each completion position of the teacher-forced sequences; 0 where `mask` is 0.

    Full-vocabulary logits are formed `chunk_size` masked positions at a time.
    """
    T = mask.shape[1]
    sel = mask.bool()
    with eval_mode(model_a, model_b):
        h_a = _last_hidden(model_a, input_ids, attention_mask)[:, -T - 1 : -1][sel]
        h_b = _last_hidden(model_b, input_ids, attention_mask)[:, -T - 1 : -1][sel]
    head_a, head_b = _head(model_a), _head(model_b)
    parts = []
    for s in range(0, h_a.shape[0], chunk_size):
        logp_a = (nn.functional.linear(h_a[s : s + chunk_size], *head_a).float() / temperature).log_softmax(-1)
        logp_b = (nn.functional.linear(h_b[s : s + chunk_size], *head_b).float() / temperature).log_softmax(-1)
        parts.append(js_divergence(logp_a, logp_b))
    flat = torch.cat(parts) if parts else h_a.new_zeros(0, dtype=torch.float32)
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(sel, flat.to(mask.device))


def _top_k_count(n: int, top_frac: float) -> int:
    """How many of n positions form the top `top_frac` (at least one when n > 0)."""
    return min(n, max(1, math.ceil(top_frac * n))) if n else 0


def js_profile(js: Tensor, mask: Tensor, n_bins: int = 10, top_frac: float = 0.05) -> dict:
    """Summary of a JS map over the masked positions (all positions of all rows pooled).

    - ``mean``: mean JS.
    - ``threshold``: the (1 − top_frac) quantile of the masked JS values (linear interpolation).
    - ``frac_above``: fraction of masked positions with JS strictly above ``threshold``; about top_frac
      for continuous values, less when many positions tie (e.g. a sparse map of exact zeros).
    - ``top_positions_share``: Σ of the k = ceil(top_frac · n) largest values / Σ of all values
      (0 when the total is 0); top_frac for a flat map, near 1 for a sparse one.
    - ``relative_position_hist``: mean JS in `n_bins` equal bins of relative position t / len, where t
      is the position's index among its row's masked positions (0-based) and len the row's mask sum;
      nan for an empty bin. ``relative_position_counts`` gives the positions per bin.
    """
    sel = mask.bool()
    values = js[sel].double()
    n = values.numel()
    if n == 0:
        return {"mean": 0.0, "threshold": 0.0, "frac_above": 0.0, "top_positions_share": 0.0,
                "relative_position_hist": [math.nan] * n_bins, "relative_position_counts": [0] * n_bins}
    threshold = float(torch.quantile(values, 1.0 - top_frac))
    total = float(values.sum())
    top = float(values.topk(_top_k_count(n, top_frac)).values.sum())
    t = mask.long().cumsum(-1) - 1
    length = mask.long().sum(-1, keepdim=True).clamp(min=1)
    bins = (t.double() / length * n_bins).floor().long().clamp(0, n_bins - 1)[sel]
    sums = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins.cpu(), values.cpu())
    counts = torch.bincount(bins.cpu(), minlength=n_bins)
    hist = [float(s / c) if c else math.nan for s, c in zip(sums.tolist(), counts.tolist())]
    return {"mean": float(values.mean()), "threshold": threshold, "frac_above": float((values > threshold).double().mean()),
            "top_positions_share": top / total if total > 0 else 0.0,
            "relative_position_hist": hist, "relative_position_counts": counts.tolist()}


def top_js_positions(js: Tensor, mask: Tensor, top_frac: float = 0.05) -> Tensor:
    """bool [B, T]: in each row, the ceil(top_frac · len) masked positions with the largest JS
    (ties broken by `topk`), as `switch_positions` for `cross_sample`."""
    out = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    scores = js.float().masked_fill(~mask.bool(), -math.inf)
    for i, n in enumerate(mask.long().sum(-1).tolist()):
        k = _top_k_count(int(n), top_frac)
        if k:
            out[i, scores[i].topk(k).indices] = True
    return out


def _switch_mask(switch_positions: Tensor | None, B: int, steps: int, device) -> Tensor:
    """bool [B, steps] from None (no switch), a bool [B, T] mask, or 1-D completion positions for every row."""
    out = torch.zeros(B, steps, dtype=torch.bool, device=device)
    if switch_positions is None:
        return out
    if switch_positions.dtype == torch.bool:
        if switch_positions.dim() != 2 or switch_positions.shape[0] != B:
            raise ValueError(f"cross_sample: a bool switch_positions must be [B={B}, T], got {tuple(switch_positions.shape)}")
        w = min(steps, switch_positions.shape[1])
        out[:, :w] = switch_positions[:, :w].to(device)
        return out
    if switch_positions.dim() != 1:
        raise ValueError("cross_sample: switch_positions must be a bool [B, T] mask or 1-D completion positions, "
                         f"got shape {tuple(switch_positions.shape)} and dtype {switch_positions.dtype}")
    pos = switch_positions.long()
    out[:, pos[(pos >= 0) & (pos < steps)].to(device)] = True
    return out


def _next_token_logits(model: nn.Module, ids: Tensor, attn: Tensor) -> Tensor:
    h = _last_hidden(model, ids, attn)[:, -1]
    return nn.functional.linear(h, *_head(model)).float()


@torch.no_grad()
def cross_sample(model_a: nn.Module, model_b: nn.Module, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor,
                 switch_positions: Tensor | None, max_new_tokens: int, eos_ids: list[int] | None = None,
                 pad_id: int | None = None) -> list[str]:
    """Greedy completions of model_a in which, at completion step t where `switch_positions` is set,
    the token is model_b's greedy choice given the same prefix (B.17's cross-sampling intervention).

    `prompt_ids`/`prompt_mask` are left-padded [B, Lp]. `switch_positions`: None (plain greedy decoding
    with model_a), a bool [B, T] mask over completion steps (e.g. `top_js_positions` of model_a's own
    greedy output), or a 1-D tensor of completion steps applied to every row. A row stops after its
    first EOS (`eos_ids`, default the tokenizer's); later tokens are `pad_id`. Returns the decoded
    completions (special tokens skipped).

    Deliberately simple: every step re-runs both models on the whole prefix (no KV cache), O(steps²)
    compute, which is fine for the small models and short completions it is meant for; model_b runs
    only at steps where some unfinished row switches. Ties in argmax resolve as `torch.argmax` does,
    which matches `generate`'s greedy search.
    """
    eos = tokenizer.eos_token_id if eos_ids is None else eos_ids
    eos_t = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=prompt_ids.device)
    pad = pad_id if pad_id is not None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                             else int(eos_t[0]))
    B = prompt_ids.shape[0]
    switch = _switch_mask(switch_positions, B, max_new_tokens, prompt_ids.device)
    ids, attn = prompt_ids, prompt_mask.long()
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    with eval_mode(model_a, model_b):
        for t in range(max_new_tokens):
            nxt = _next_token_logits(model_a, ids, attn).argmax(-1)
            use_b = switch[:, t] & ~done
            if use_b.any():
                nxt = torch.where(use_b, _next_token_logits(model_b, ids, attn).argmax(-1), nxt)
            nxt = nxt.masked_fill(done, pad)
            ids = torch.cat([ids, nxt[:, None]], 1)
            attn = torch.cat([attn, torch.ones_like(nxt)[:, None]], 1)  # as `generate`: finished rows keep 1s
            done = done | torch.isin(nxt, eos_t)
            if done.all():
                break
    return tokenizer.batch_decode(ids[:, prompt_ids.shape[1]:], skip_special_tokens=True)
