"""Padding-free packed sequences vs the padded batch: the LM training forward + backward (completion log-probs
through LMForward, as the loop runs them), on the same mixed-length batch with ~50% padding.

Both variants run on the same model and batch in one process, repetitions interleaved (padded, packed,
padded, ...) so drift on a shared machine hits both alike; each time is the median. "equal" checks that
the packed log-probs (and every parameter gradient) match the padded ones.

On sdpa/eager the packed row attends through a dense block-diagonal causal mask [1, 1, N, N]
(llm_rl/packing.py): packing removes the padding from projections, MLPs and norms, but attention
costs N^2 = (B * L * fill)^2 instead of B * L^2, i.e. B * fill^2 times the padded attention, so the
gain shrinks as the micro-batch grows. The rows vary the batch size and the model's share of
per-token decoder work against the LM head (the head's work is on completion tokens in both
variants and does not shrink). Target: >= 1.3x faster at 50% padding.

Prints a table and writes benchmarks/results/packing.json.
    python benchmarks/bench_packing.py [--reps 2 --prompt-len 96 --completion-len 160]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

# name -> Qwen2 shape. "decoder-heavy": decoder work per token about 3.8x the LM head's, as in Qwen2.5-0.5B
# (~2.6x) to 1.5B (~5.6x); "head-heavy": the tiny 32k-vocabulary model, where the head dominates.
MODELS = {
    "decoder-heavy": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=8192),
    "head-heavy": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=32000),
}
# (model, micro-batch size); the first row is the headline
ROWS = [("decoder-heavy", 8), ("decoder-heavy", 4), ("decoder-heavy", 16), ("head-heavy", 8)]


def build_model(name: str, attention: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(max_position_embeddings=2048, tie_word_embeddings=True, attn_implementation=attention,
                      **MODELS[name])
    return Qwen2ForCausalLM(cfg).float()


def mixed_batch(batch: int, prompt_len: int, completion_len: int, vocab: int, seed: int = 0):
    """[left-padded prompt | right-padded completion]; prompt and completion lengths evenly spread over
    [L/16, 15 L/16] and shuffled, so every batch size gets 50% padding."""
    g = torch.Generator().manual_seed(seed)
    P, T = prompt_len, completion_len
    spread = lambda n: torch.linspace(n / 16, 15 * n / 16, batch).round().long()[torch.randperm(batch, generator=g)]
    pl, cl = spread(P), spread(T)
    ids = torch.randint(1, vocab, (batch, P + T), generator=g)
    am = torch.zeros(batch, P + T, dtype=torch.long)
    mask = torch.zeros(batch, T, dtype=torch.long)
    for i in range(batch):
        am[i, P - pl[i] : P] = 1
        am[i, P : P + cl[i]] = 1
        mask[i, : cl[i]] = 1
    return ids.masked_fill(am == 0, 0), am, mask


def train_step(module, ids, am, mask):
    """One training forward + backward of a token-level loss on the completion log-probs; (seconds, logp, grads)."""
    module.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    logp, _ = module(ids, am, mask)
    (-(logp * mask).sum() / mask.sum()).backward()
    dt = time.perf_counter() - t0
    return dt, logp.detach(), [p.grad.clone() for p in module.parameters()]


def bench_row(model_name: str, batch: int, args) -> dict:
    from llm_rl.policy import LMForward

    model = build_model(model_name, args.attention)
    ids, am, mask = mixed_batch(batch, args.prompt_len, args.completion_len, model.config.vocab_size)
    variants = {"padded": LMForward(model, chunk_size=1024), "packed": LMForward(model, chunk_size=1024, packed=True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    out = {}
    for rep in range(args.reps + 1):  # the first round warms up
        for name, module in variants.items():
            dt, logp, grads = train_step(module, ids, am, mask)
            if rep:
                times[name].append(dt)
            out[name] = (logp, grads)
    (lp0, g0), (lp1, g1) = out["padded"], out["packed"]
    logp_err = float((lp1 - lp0).abs().max())
    grad_err = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(g1, g0))
    padded_s, packed_s = statistics.median(times["padded"]), statistics.median(times["packed"])
    tokens = int(am.sum())
    return {
        "model": model_name, **{k: MODELS[model_name][k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "batch": batch, "seq_len": am.shape[1], "real_tokens": tokens, "padding": 1 - tokens / am.numel(),
        "padded_s": padded_s, "packed_s": packed_s, "speedup": padded_s / packed_s,
        "attention_cost_ratio": tokens**2 / (batch * am.shape[1] ** 2),  # packed N^2 over padded B L^2
        "max_logp_abs_err": logp_err, "max_grad_rel_err": grad_err,
        "values_equal": logp_err <= 1e-4 and grad_err <= 1e-4,
    }


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--completion-len", type=int, default=160)
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = [bench_row(m, b, args) for m, b in ROWS]
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU, "
               f"torch {torch.__version__}, transformers {transformers.__version__}, {args.attention}, fp32")
    print(f"packed vs padded LM training forward+backward ({machine}); target: >= 1.3x faster at 50% padding")
    print("| model | hidden/layers/vocab | batch x len | padding | padded s | packed s | speedup | "
          "attention N^2 / B L^2 | equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['hidden_size']}/{r['num_hidden_layers']}/{r['vocab_size']} | "
              f"{r['batch']} x {r['seq_len']} | {r['padding']:.0%} | {r['padded_s']:.3f} | {r['packed_s']:.3f} | "
              f"{r['speedup']:.2f}x | {r['attention_cost_ratio']:.2f} | {'yes' if r['values_equal'] else 'no'} |")
    head = rows[0]
    verdict = "met" if head["speedup"] >= 1.3 else "NOT met"
    print(f"headline ({head['model']}, batch {head['batch']}): {head['speedup']:.2f}x -> target {verdict}; "
          f"total {time.perf_counter() - t0:.0f}s")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "packing.json").write_text(json.dumps(
        {"machine": machine, "args": vars(args), "target": ">= 1.3x faster at 50% padding",
         "headline": {"speedup": head["speedup"], "target_met": head["speedup"] >= 1.3}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
