"""Selective log-prob (chunked, checkpointed) vs log_softmax + gather: peak memory and time.

Each variant runs forward + backward in a fresh subprocess so its peak resident memory (ru_maxrss)
is its own; the baseline is measured in the same run. Prints a table and writes
benchmarks/results/logprobs.json.   python benchmarks/bench_logprobs.py [--tokens 1024 --hidden 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def run_variant(variant: str, tokens: int, hidden: int, vocab: int, chunk: int, reps: int) -> dict:
    from shared.logprobs import reference_log_probs, selective_log_probs

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_()
    tgt = torch.randint(vocab, (tokens,))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, values = [], None
    for _ in range(reps):
        h.grad = w.grad = None
        t0 = time.perf_counter()
        if variant == "baseline":
            lp = reference_log_probs(h @ w.T, tgt)
        else:
            lp, _ = selective_log_probs(h, w, tgt, chunk_size=chunk)
        lp.sum().backward()
        times.append(time.perf_counter() - t0)
        values = lp.detach()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"seconds": statistics.median(times), "peak_extra_mib": (peak - base_rss) / 1024,
            "checksum": float(values.double().sum()), "grad_checksum": float(w.grad.double().abs().sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32000, 151936])
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variant")
    ap.add_argument("--vocab", type=int)
    args = ap.parse_args()
    if args.variant:  # child process
        print(json.dumps(run_variant(args.variant, args.tokens, args.hidden, args.vocab, args.chunk, args.reps)))
        return
    rows = []
    for vocab in args.vocabs:
        res = {}
        for variant in ("baseline", "selective"):
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--vocab", str(vocab),
                                  "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--chunk", str(args.chunk),
                                  "--reps", str(args.reps)], capture_output=True, text=True, check=True)
            res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        b, s = res["baseline"], res["selective"]
        rows.append({
            "vocab": vocab, "tokens": args.tokens, "hidden": args.hidden, "chunk": args.chunk,
            "baseline_mib": b["peak_extra_mib"], "selective_mib": s["peak_extra_mib"],
            "memory_ratio": b["peak_extra_mib"] / max(s["peak_extra_mib"], 1e-9),
            "baseline_s": b["seconds"], "selective_s": s["seconds"], "time_ratio": s["seconds"] / b["seconds"],
            "values_equal": abs(b["checksum"] - s["checksum"]) <= 1e-3 * max(1.0, abs(b["checksum"])),
            "grads_equal": abs(b["grad_checksum"] - s["grad_checksum"]) <= 1e-3 * max(1.0, b["grad_checksum"]),
        })
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU"
    print(f"selective log-prob vs log_softmax+gather ({machine}), forward+backward")
    print("| vocab | tokens | baseline peak MiB | selective peak MiB | memory ratio (×lower) | time ratio | equal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['vocab']} | {r['tokens']} | {r['baseline_mib']:.0f} | {r['selective_mib']:.0f} | "
              f"{r['memory_ratio']:.1f} | {r['time_ratio']:.2f} | {r['values_equal'] and r['grads_equal']} |")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "logprobs.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
