"""VLM group rollout: vision tower + prompt prefill once per prompt (shared KV cache) vs once per sample.

VLMPolicy.sample with n samples per prompt runs, by default, the vision tower and the prefill of each prompt
once and decodes its n samples from the repeated KV cache (vision_rl/generation.py); the baseline is the
per-sample path (`share_prefill=False`: each prompt's inputs repeated n times through `generate`). Same
embedded Qwen2-VL, same prompts (images of several sizes), same seed; "equal" checks that both paths give the
same completions (counter-based sampling makes them identical). Decoding is identical in both, so the gain
is the (n - 1) / n share of vision + prefill work and grows with image size and n, and shrinks as the
completions get longer.

Both variants run in one process, repetitions interleaved (baseline, ours, baseline, ...) so drift on a shared
machine hits both alike; each time is the median.

Prints a table and writes benchmarks/results/vlm_rollout.json.
    python benchmarks/bench_vlm_rollout.py [--prompts 4 --n 4 8 --max-new-tokens 32 --reps 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

MODEL = dict(hidden_size=256, num_layers=4, num_heads=4, vision_depth=4, vision_dim=128)
# (width, height) of the prompts' images, cycled: 64, 80 and 88 image tokens after smart_resize and the 2x2 merge
SIZES = [(224, 224), (280, 224), (224, 320)]
MIN_PX, MAX_PX = 3136, 280 * 320


def main() -> None:
    from vision_rl.coords import BoxCoder
    from vision_rl.embedded import build_model, build_processor, build_tokenizer
    from vision_rl.policy import VLMPolicy
    from vision_rl.tasks.shapes import ShapesTask, ShapesTaskConfig, tokenizer_corpus

    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8], help="samples per prompt (one table row each)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    tok = build_tokenizer(*tokenizer_corpus())
    torch.manual_seed(0)
    model = build_model(tok, args.family, **MODEL).to(device)
    processor = build_processor(tok, args.family, MIN_PX, MAX_PX)
    rows = []
    for i in range(args.prompts):
        size = SIZES[i % len(SIZES)]
        cfg = ShapesTaskConfig(kind="detection", image_size=size, min_pixels=MIN_PX, max_pixels=MAX_PX,
                               eval_size=args.prompts, sft_size=0, val_size=0, train_size=1)
        rows.append(ShapesTask(cfg, BoxCoder("relative_1000", MIN_PX, MAX_PX)).split("eval")[i])
    kw = dict(min_pixels=MIN_PX, max_pixels=MAX_PX, max_new_tokens=args.max_new_tokens)
    ours = VLMPolicy(model, processor, **kw)
    baseline = VLMPolicy(model, processor, share_prefill=False, **kw)

    def run(policy, n):
        t0 = time.perf_counter()
        r = policy.sample(rows, n, seed=0, first_sample_id=0, first_group_id=0)
        return time.perf_counter() - t0, r

    out_rows = []
    for n in args.n:
        run(baseline, n), run(ours, n)  # warm-up
        t_base, t_ours = [], []
        for _ in range(args.reps):
            dt, rb = run(baseline, n)
            t_base.append(dt)
            dt, ro = run(ours, n)
            t_ours.append(dt)
        equal = ro.completions == rb.completions and torch.equal(ro.inputs["input_ids"], rb.inputs["input_ids"])
        base_s, ours_s = statistics.median(t_base), statistics.median(t_ours)
        out_rows.append({"benchmark": f"rollout {args.prompts} prompts x n={n}", "baseline": "vision+prefill per sample",
                         "baseline_s": base_s, "ours_s": ours_s, "ratio": ours_s / base_s,
                         "speedup": base_s / ours_s, "equal": equal})

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}"
    image_tokens = [int(g.prod()) // 4 for g in ours.encode_rows(rows, "cpu")["image_grid_thw"]]
    print(f"VLM rollout ({machine}; embedded {args.family} {MODEL}, image tokens {image_tokens}, "
          f"{args.max_new_tokens} new tokens per sample)")
    print("| benchmark | baseline | baseline s | ours s | ratio | speedup | equal |")
    print("|---|---|---|---|---|---|---|")
    for r in out_rows:
        print(f"| {r['benchmark']} | {r['baseline']} | {r['baseline_s']:.3f} | {r['ours_s']:.3f} | {r['ratio']:.2f} "
              f"| {r['speedup']:.2f}x | {r['equal']} |")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "vlm_rollout.json").write_text(json.dumps(
        {"machine": machine, "args": vars(args), "model": MODEL, "image_tokens": image_tokens, "rows": out_rows},
        indent=2))
    if not all(r["equal"] for r in out_rows):
        raise SystemExit("the shared-prefill rollout differs from the per-sample one")


if __name__ == "__main__":
    main()
