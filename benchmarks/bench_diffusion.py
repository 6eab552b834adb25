"""Diffusion sampling costs against baselines measured in the same run (issue 8 targets).

1. rollout with log-probs (DiffusionPolicy.sample: stores the trajectory and every step's log-prob)
   vs the diffusers pipeline's own sampling (StableDiffusionPipeline.__call__ with the same DDIM
   scheduler, eta, steps, guidance and batch); target <= 1.10x time.
2. RLG sampling (base + RL model, two guided UNet evaluations per step) vs single-model sampling of
   the same images; target <= 2.05x time.

Prints a table and writes benchmarks/results/diffusion.json.
    python benchmarks/bench_diffusion.py [--batch 16 --steps 20 --image-size 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from diffusers import DDIMScheduler

    from diffusion_rl.embedded import build_pipeline
    from diffusion_rl.guidance import guided_sample
    from diffusion_rl.policy import DiffusionPolicy
    from diffusion_rl.tasks.shapes import COLOURS, SHAPES

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    pipe = build_pipeline(["a", *COLOURS, *SHAPES], args.image_size).to(device)
    pipe.set_progress_bar_config(disable=True)
    policy = DiffusionPolicy(pipe, num_steps=args.steps, guidance_scale=args.guidance, eta=1.0, eval_eta=1.0)
    policy.build_reference()
    with torch.no_grad():  # the "RL model": the same architecture with different weights
        for p in policy.module.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    prompts = [f"a {c} {s}" for c in COLOURS for s in SHAPES][: args.batch]
    prompts += prompts[: args.batch - len(prompts)]
    rows = [{"prompt": p, "seed": i} for i, p in enumerate(prompts)]
    size = args.image_size

    def diffusers_sampling():
        pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, eta=1.0, height=size, width=size,
             output_type="pil")

    def rollout():
        policy.sample(rows, 1, seed=0, first_sample_id=0, first_group_id=0)

    def one_model():
        noise = policy.noise(0, list(range(len(rows))))
        cond = policy.encode_prompts(prompts)
        uncond = policy.encode_prompts([""]).expand_as(cond).contiguous()
        with policy.eval_mode() as model:
            policy.decode(policy.denoise(model, noise, cond, uncond, 1.0))

    def rlg():
        guided_sample(policy, rows, 1.5)

    t_pipe, t_roll = timed(diffusers_sampling, args.reps), timed(rollout, args.reps)
    t_one, t_rlg = timed(one_model, args.reps), timed(rlg, args.reps)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}"
    rows_out = [
        {"benchmark": "diffusion sampling with log-probs", "baseline": "diffusers pipeline sampling",
         "baseline_s": t_pipe, "ours_s": t_roll, "ratio": t_roll / t_pipe, "target": "<= 1.10"},
        {"benchmark": "RLG sampling (w=1.5)", "baseline": "single-model sampling",
         "baseline_s": t_one, "ours_s": t_rlg, "ratio": t_rlg / t_one, "target": "<= 2.05"},
    ]
    print(f"diffusion sampling ({machine}; batch {args.batch}, {args.steps} DDIM steps, CFG {args.guidance}, "
          f"{size}x{size} images)")
    print("| benchmark | baseline | baseline s | ours s | ratio | target |")
    print("|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['benchmark']} | {r['baseline']} | {r['baseline_s']:.3f} | {r['ours_s']:.3f} | {r['ratio']:.2f} | {r['target']} |")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "diffusion.json").write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows_out}, indent=2))


if __name__ == "__main__":
    main()
