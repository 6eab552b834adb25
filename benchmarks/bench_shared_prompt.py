"""Shared-prompt vs padded LM training forward + backward (completion log-probs and entropies through LMForward,
as the loop runs them) on micro-batches of G samples per prompt.

The shared-prompt forward (llm_rl/shared_prompt.py, `train.shared_prompt`) runs each distinct prompt once and
the completions against its KV cache, so the decoder sees U * P + B * T positions instead of B * (P + T);
the LM head works on the completion tokens in both variants. Rows:

- quickstart: the GRPO step benchmark's micro-batch (benchmarks/bench_grpo_step.py): the arithmetic task's
  tiny Qwen2 (hidden 128 x 2 layers, 4-digit additions), 256 rows = 16 prompts x G=16, completions of 1-7
  tokens. Headline row; target >= 1.5x faster (the padded forward spends ~64% of its positions on repeated
  prompts there);
- decoder-heavy model (the packing benchmark's Qwen2 shape, hidden 512 x 4 layers), 16 rows = 2 prompts x G=8,
  once with prompts longer than completions and once the other way round (less to share).

Both variants run on the same model and batch in one process, repetitions interleaved (padded, shared,
padded, ...) so drift on a shared machine hits both alike; the first round warms up and each time is the
median. "equal" checks the log-probs and every parameter gradient against the padded ones.

    OMP_NUM_THREADS=1 python benchmarks/bench_shared_prompt.py [--reps 3]
Prints a table and writes benchmarks/results/shared_prompt.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "shared_prompt.json"
TARGET = 1.5  # padded s / shared s on the headline row
DECODER_HEAVY = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 8,
                 "num_key_value_heads": 2, "vocab_size": 8192}
# (name, prompts, G, max prompt length, max completion length); the first row is the headline
ROWS = [("quickstart", 16, 16, None, 7), ("decoder-heavy", 2, 8, 192, 64), ("decoder-heavy", 2, 8, 64, 192)]


def quickstart_model_and_prompts(n_prompts: int, seed: int = 0):
    """The GRPO benchmark's model (random weights: speed does not depend on them) and left-padded task prompts."""
    from benchmarks.bench_grpo_step import task_config
    from llm_rl.tasks.arithmetic import ArithmeticTask, build_model, build_tokenizer

    torch.manual_seed(seed)
    tcfg = task_config()
    tok = build_tokenizer()
    model = build_model(tcfg, tok).float()
    rows = ArithmeticTask(tcfg).split("train")[:n_prompts]
    enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True, padding_side="left",
              add_special_tokens=False)
    return model, enc["input_ids"], enc["attention_mask"]


def decoder_heavy_model_and_prompts(n_prompts: int, max_len: int, seed: int = 0):
    """The packing benchmark's decoder-heavy Qwen2 and random prompts of lengths spread over [max_len/2, max_len]."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(max_position_embeddings=2048, tie_word_embeddings=True, attn_implementation="sdpa",
                      **DECODER_HEAVY)
    model = Qwen2ForCausalLM(cfg).float()
    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(max_len // 2, max_len, n_prompts).round().long()
    ids = torch.randint(1, cfg.vocab_size, (n_prompts, max_len), generator=g)
    am = (torch.arange(max_len) >= max_len - lengths[:, None]).long()
    return model, ids.masked_fill(am == 0, 0), am


def grouped_batch(prompt_ids, prompt_mask, G: int, max_completion: int, vocab: int, seed: int = 0):
    """[prompt | completion] rows, G per prompt, rows shuffled (groups not contiguous); completion lengths spread
    over [1, max_completion]."""
    g = torch.Generator().manual_seed(seed)
    B, T = prompt_ids.shape[0] * G, max_completion
    order = torch.randperm(B, generator=g)
    lengths = torch.linspace(1, T, B).round().long()[torch.randperm(B, generator=g)]
    comp = torch.randint(1, vocab, (B, T), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).long()
    ids = torch.cat([prompt_ids.repeat_interleave(G, 0)[order], comp.masked_fill(mask == 0, 0)], 1)
    am = torch.cat([prompt_mask.repeat_interleave(G, 0)[order], mask], 1)
    return ids, am, mask


def train_step(module, ids, am, mask):
    """One training forward + backward of a token-mean loss on log-probs and entropies; (seconds, logp, grads)."""
    module.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    logp, ent = module(ids, am, mask, with_entropy=True)
    (-(logp * mask).sum() / mask.sum() - 0.01 * (ent * mask).sum() / mask.sum()).backward()
    dt = time.perf_counter() - t0
    return dt, logp.detach(), [p.grad.clone() for p in module.parameters()]


def bench_row(name: str, n_prompts: int, G: int, prompt_len: int | None, completion_len: int, reps: int) -> dict:
    from llm_rl.policy import LMForward

    if name == "quickstart":
        model, p_ids, p_mask = quickstart_model_and_prompts(n_prompts)
    else:
        model, p_ids, p_mask = decoder_heavy_model_and_prompts(n_prompts, prompt_len)
    ids, am, mask = grouped_batch(p_ids, p_mask, G, completion_len, model.config.vocab_size)
    variants = {"padded": LMForward(model), "shared": LMForward(model, shared_prompt=True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    out = {}
    for rep in range(reps + 1):  # the first round warms up
        for variant, module in variants.items():
            dt, logp, grads = train_step(module, ids, am, mask)
            if rep:
                times[variant].append(dt)
            out[variant] = (logp, grads)
    (lp0, g0), (lp1, g1) = out["padded"], out["shared"]
    logp_err = float((lp1 - lp0).abs().max())
    grad_err = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(g1, g0))
    padded_s, shared_s = statistics.median(times["padded"]), statistics.median(times["shared"])
    B, P = p_ids.shape[0] * G, p_ids.shape[1]
    T = mask.shape[1]
    cfg = model.config
    return {
        "model": name, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size, "prompts": p_ids.shape[0], "G": G, "rows": B, "prompt_cols": P,
        "completion_cols": T, "prompt_tokens": int(am[:, :P].sum()), "completion_tokens": int(mask.sum()),
        # decoder positions: padded B (P + T) vs shared U P + B T
        "decoder_positions": {"padded": B * (P + T), "shared": p_ids.shape[0] * P + B * T},
        "padded_s": padded_s, "shared_s": shared_s, "speedup": padded_s / shared_s,
        "padded_times_s": times["padded"], "shared_times_s": times["shared"],
        "max_logp_abs_err": logp_err, "max_grad_rel_err": grad_err,
        "values_equal": logp_err <= 1e-4 and grad_err <= 1e-4,
    }


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = [bench_row(*r, reps=args.reps) for r in ROWS]
    threads = torch.get_num_threads()
    machine = (f"{platform.processor() or platform.machine()} CPU, {threads} thread(s), torch {torch.__version__}, "
               f"transformers {transformers.__version__}, sdpa, fp32")
    print(f"shared-prompt vs padded LM training forward+backward ({machine}); target: headline >= {TARGET}x faster")
    print("| model | hidden/layers/vocab | prompts x G | prompt + completion cols | decoder positions padded -> "
          "shared | padded s | shared s | speedup | equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pos = r["decoder_positions"]
        print(f"| {r['model']} | {r['hidden_size']}/{r['num_hidden_layers']}/{r['vocab_size']} | "
              f"{r['prompts']} x {r['G']} | {r['prompt_cols']} + {r['completion_cols']} | "
              f"{pos['padded']} -> {pos['shared']} | {r['padded_s']:.3f} | {r['shared_s']:.3f} | "
              f"{r['speedup']:.2f}x | {'yes' if r['values_equal'] else 'no'} |")
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    out_rows = []
    for i, r in enumerate(rows):
        headline = i == 0
        out_rows.append({
            "benchmark": (f"shared-prompt training fwd+bwd, {r['model']} model, {r['prompts']} prompts x G={r['G']}, "
                          f"prompt {r['prompt_cols']} + completion {r['completion_cols']} cols"),
            "baseline": "padded forward", "ours_s": r["shared_s"], "baseline_s": r["padded_s"],
            "ratio": r["speedup"], "ratio_definition": "padded s / shared s",
            "target": f">= {TARGET}" if headline else "— (headline row only)",
            **({"target_met": r["speedup"] >= TARGET and r["values_equal"]} if headline else {}),
            **{k: v for k, v in r.items() if k not in ("padded_s", "shared_s", "speedup")},
        })
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"machine": machine, "args": vars(args), "rows": out_rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
