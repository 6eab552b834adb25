"""Rollout throughput: our `CausalLMPolicy.sample` vs a plain HF `model.generate(do_sample=True)` loop.

Why: every online RL step starts with sampling, and `CausalLMPolicy.sample` replaces `generate`'s sampler
with counter-based inverse-CDF sampling (shared/sampling.py: one hashed uniform per row keyed by (seed,
sample id, position), a float64 cumulative sum over the vocabulary at every decoding step, so rollouts do not
depend on the process layout) and adds the completion mask, decoding and the Rollout record. This measures
what that costs against the plain loop a user would write.

Both sides get the same model, the same prompts (tokenised by the same tokenizer, left-padded), n
completions per prompt, max_new_tokens, temperature 1, no top-k/top-p, KV cache, eval mode, and both return
texts:
- baseline: tokenise, `repeat_interleave(n)`, `model.generate(do_sample=True, top_k=0, top_p=1.0,
  temperature=1.0, ...)`, mask after the first EOS, `batch_decode`;
- ours: `CausalLMPolicy.sample(rows, n, seed, ...)` (tokenise, repeat, `generate` with the counter-based
  sampling processor, mask, decode, Rollout with group ids and per-row lengths).
Tokens are the completion tokens up to and including the first EOS; tokens/s = tokens / wall seconds of the
call. Repetitions alternate (baseline, ours, baseline, ...) after one warm-up call each, so drift on a shared
machine hits both alike; the figure is the median seconds per call, and tokens/s uses the median tokens.
`decode_steps` (the longest completion of each call, i.e. how many forward passes `generate` ran) is
reported so unequal work from sampling noise is visible.

Rows: the quickstart's model and rollout shape (the arithmetic task's tiny Qwen2, SFT-warmed as in
bench_grpo_step.py, 20-token vocabulary) and Qwen2 models with 32k and 152k (Qwen2.5's 151,936) vocabularies
(random weights, so completions run to max_new_tokens on both sides), where the per-step whole-vocabulary
work of either sampler is a real cost. Target: ours >= 1.0x the baseline's tokens/s.

    OMP_NUM_THREADS=1 python benchmarks/bench_rollout.py [--reps 9] [--big-vocab 32000 151936]
Prints a table and writes benchmarks/results/rollout.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results" / "rollout.json"
TARGET = ">= 1.0"  # ours tokens/s / baseline tokens/s


def big_vocab_tokenizer(vocab_size: int):
    """The arithmetic task's character vocabulary (so prompts tokenise identically) padded with filler
    tokens "<tN>" to `vocab_size`, as a real fast tokenizer that decodes every id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llm_rl.tasks.arithmetic import CHARS, SPECIAL

    base = SPECIAL + CHARS
    vocab = {t: i for i, t in enumerate(base + [f"<t{i}>" for i in range(vocab_size - len(base))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   padding_side="left")


def big_vocab_model(tok, vocab_size: int, hidden: int, layers: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    model = Qwen2ForCausalLM(cfg).float()
    model.config.use_cache = True
    return model


def hf_generate(model, tok, prompts: list[str], n: int, max_new_tokens: int, eos_id: int, pad_id: int):
    """The plain loop: tokenise, repeat, generate(do_sample=True), mask after EOS, decode; (tokens, steps)."""
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids, am = enc["input_ids"].repeat_interleave(n, 0), enc["attention_mask"].repeat_interleave(n, 0)
    out = model.generate(input_ids=ids, attention_mask=am, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True)
    comp = out[:, ids.shape[1]:]
    is_eos = comp == eos_id
    mask = ((is_eos.long().cumsum(-1) - is_eos.long()) == 0).long()
    tok.batch_decode(comp.masked_fill(mask == 0, pad_id), skip_special_tokens=True)
    return int(mask.sum()), int(comp.shape[1])


def bench_row(name: str, model, tok, prompts: list[str], n: int, max_new_tokens: int, reps: int) -> dict:
    from llm_rl.policy import CausalLMPolicy

    model.eval()
    policy = CausalLMPolicy(model, tok, temperature=1.0, max_new_tokens=max_new_tokens)
    rows = [{"prompt": p} for p in prompts]
    eos_id, pad_id = tok.eos_token_id, tok.pad_token_id

    def ours(rep: int):
        roll = policy.sample(rows, n, seed=0, first_sample_id=rep * len(rows) * n, first_group_id=rep * len(rows))
        return int(roll.mask.sum()), int(roll.mask.shape[1])

    def baseline(rep: int):
        torch.manual_seed(rep)
        return hf_generate(model, tok, prompts, n, max_new_tokens, eos_id, pad_id)

    res = {"baseline": {"s": [], "tokens": [], "steps": []}, "ours": {"s": [], "tokens": [], "steps": []}}
    for rep in range(reps + 1):  # rep 0 warms both up
        for side, fn in (("baseline", baseline), ("ours", ours)):
            t0 = time.perf_counter()
            tokens, steps = fn(rep)
            dt = time.perf_counter() - t0
            if rep:
                res[side]["s"].append(dt)
                res[side]["tokens"].append(tokens)
                res[side]["steps"].append(steps)
    med = {side: {"s": statistics.median(r["s"]), "tokens": statistics.median(r["tokens"]),
                  "steps": statistics.median(r["steps"])} for side, r in res.items()}
    tps = {side: m["tokens"] / m["s"] for side, m in med.items()}
    ratio = tps["ours"] / tps["baseline"]
    return {
        "benchmark": name, "baseline": "HF generate(do_sample=True)",
        "ours_value": tps["ours"], "baseline_value": tps["baseline"], "unit": "tok/s",
        "ours_tokens_per_s": tps["ours"], "baseline_tokens_per_s": tps["baseline"],
        "ours_s": med["ours"]["s"], "baseline_s": med["baseline"]["s"],
        "ratio": ratio, "ratio_definition": "ours tok/s / HF tok/s", "target": TARGET,
        "target_met": ratio >= 1.0,
        "sequences": len(prompts) * n, "max_new_tokens": max_new_tokens, "vocab_size": model.config.vocab_size,
        "tokens_median": {side: m["tokens"] for side, m in med.items()},
        "decode_steps_median": {side: m["steps"] for side, m in med.items()},
        "seconds_all": {side: r["s"] for side, r in res.items()},
    }


def main() -> None:
    from bench_grpo_step import build_bench_model, machine_line, task_config

    from llm_rl.tasks.arithmetic import ArithmeticTask

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--sft-steps", type=int, default=300, help="SFT warm-up of the quickstart-shaped model")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=7)
    ap.add_argument("--big-vocab", type=int, nargs="*", default=[32000, 151936],
                    help="vocabularies of the random-weight rows (none: skip them)")
    ap.add_argument("--big-prompts", type=int, default=8)
    ap.add_argument("--big-n", type=int, default=8)
    ap.add_argument("--big-new-tokens", type=int, default=32)
    args = ap.parse_args()
    t_start = time.perf_counter()
    prompts = [r["prompt"] for r in ArithmeticTask(task_config()).split("train")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        warm = build_bench_model(Path(tmp), args.sft_steps, 0, args.max_new_tokens)
        tok = AutoTokenizer.from_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        model.config.use_cache = True
        rows.append(bench_row(f"rollout, quickstart model (vocab {model.config.vocab_size}, hidden 128 x 2 layers), "
                              f"{args.prompts} prompts x {args.n}, <= {args.max_new_tokens} new tokens",
                              model, tok, prompts[: args.prompts], args.n, args.max_new_tokens, args.reps))
        print(f"  {rows[-1]['benchmark']}: x{rows[-1]['ratio']:.2f}", file=sys.stderr, flush=True)
    for vocab in args.big_vocab:
        tok = big_vocab_tokenizer(vocab)
        model = big_vocab_model(tok, vocab, 256, 4)
        rows.append(bench_row(f"rollout, vocab {vocab} (random weights, hidden 256 x 4 layers), "
                              f"{args.big_prompts} prompts x {args.big_n}, {args.big_new_tokens} new tokens",
                              model, tok, prompts[: args.big_prompts], args.big_n, args.big_new_tokens, args.reps))
        print(f"  {rows[-1]['benchmark']}: x{rows[-1]['ratio']:.2f}", file=sys.stderr, flush=True)
    machine = machine_line()
    print(f"rollout tokens/s, CausalLMPolicy.sample vs HF generate(do_sample=True) ({machine}); target: {TARGET}x")
    print("| benchmark | HF tok/s | ours tok/s | ratio | tokens HF / ours | decode steps HF / ours | target met |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        t, s = r["tokens_median"], r["decode_steps_median"]
        print(f"| {r['benchmark']} | {r['baseline_tokens_per_s']:.0f} | {r['ours_tokens_per_s']:.0f} | "
              f"{r['ratio']:.2f}x | {t['baseline']:.0f} / {t['ours']:.0f} | {s['baseline']:.0f} / {s['ours']:.0f} | "
              f"{'yes' if r['target_met'] else 'no'} |")
    print(f"total {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"machine": machine, "target": f"ours tok/s / baseline tok/s {TARGET}",
                               "args": vars(args), "shared_model": warm, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
