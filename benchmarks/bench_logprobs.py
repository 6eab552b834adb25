"""Selective log-prob (shared/logprobs.py) vs log_softmax + gather: extra peak memory and time, fwd + bwd.

Variants: `baseline` (full [N, V] logits, log_softmax, gather), `chunked` (backend="chunked" at each
--chunks size), `checkpoint` (the previous implementation, activation-checkpointed chunks, kept here for
comparison) and, on CUDA, `triton` (the fused kernel).

What is measured, and why it is measured this way:
- Memory is the EXTRA peak over what every variant must hold anyway: the inputs (allocated before the
  measurement) and the gradients dH, dW (subtracted). An earlier version reported ru_maxrss deltas of a
  process whose high-water mark already included import-time and first-call allocations, glibc's retained
  heap (chunk-sized buffers under the 32 MiB dynamic mmap threshold are kept after free) and the dW buffer
  that both variants allocate; with 1024 tokens x H 256 the inputs and dW were a large part of the
  number, so the ratio said little about the logits. Now, on CPU, each variant runs once to warm up (code
  pages, grads), the grads are dropped, the process' RSS high-water mark is reset (/proc/self/clear_refs)
  and the measured run's VmHWM minus the RSS before it, minus the gradient bytes, is reported. The memory
  child runs with MALLOC_MMAP_THRESHOLD_=131072 so every freed tensor of 128 KiB or more goes back to the
  OS and RSS follows the live tensors. On CUDA the same is read from torch.cuda.max_memory_allocated.
- Time is the median of --reps forward+backward runs after a warm-up, in a separate child with the
  default allocator (what training sees), OMP threads as inherited.
- A realistic token count (4096 completion tokens per micro-batch) makes the [N, V] logits, not the
  inputs, dominate, which is the regime selective log-probs exist for.
- Equality: each variant's log-probs and gradients are compared element-wise with the baseline's.

    OMP_NUM_THREADS=1 python benchmarks/bench_logprobs.py [--cases 32000x4096 151936x1024 --chunks 512 1024]
Prints a markdown table and writes benchmarks/results/logprobs.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _checkpointed_log_probs(h, w, b, tgt, chunk: int):
    """The previous implementation: every chunk under activation checkpointing (forward runs twice)."""
    from torch.utils.checkpoint import checkpoint

    def one(hc, tc):
        logits = torch.nn.functional.linear(hc, w, b).float()
        return logits.gather(-1, tc.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)

    return torch.cat([checkpoint(one, h[s : s + chunk], tgt[s : s + chunk], use_reentrant=False)
                      for s in range(0, h.shape[0], chunk)])


def _step(variant: str, h, w, b, tgt, chunk: int):
    """One forward + backward of sum(logp); returns logp."""
    from shared.logprobs import reference_log_probs, selective_log_probs

    if variant == "baseline":
        lp = reference_log_probs(torch.nn.functional.linear(h, w, b), tgt)
    elif variant == "checkpoint":
        lp = _checkpointed_log_probs(h, w, b, tgt, chunk)
    else:  # "chunked" | "triton"
        lp, _ = selective_log_probs(h, w, tgt, 1.0, b, chunk, backend=variant)
    lp.sum().backward()
    return lp.detach()


def _rss_mib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def _inputs(tokens: int, hidden: int, vocab: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype).requires_grad_()
    tgt = torch.randint(vocab, (tokens,), generator=g).to(device)
    return h, w, tgt


def measure_memory(variant: str, tokens: int, hidden: int, vocab: int, chunk: int, device: str,
                   dtype: torch.dtype, dump: str) -> dict:
    """Extra peak MiB of one fwd+bwd over inputs and grads; saves logp and grads to `dump` for comparison."""
    h, w, tgt = _inputs(tokens, hidden, vocab, device, dtype)
    _step(variant, h, w, None, tgt, chunk)  # warm-up: code paths, kernels, allocator
    grad_mib = (h.numel() * h.element_size() + w.numel() * w.element_size()) / 2**20
    h.grad = w.grad = None
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
        lp = _step(variant, h, w, None, tgt, chunk)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        base = _rss_mib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        lp = _step(variant, h, w, None, tgt, chunk)
        peak = _rss_mib("VmHWM")
    torch.save({"logp": lp.cpu(), "dh": h.grad.cpu(), "dw": w.grad.cpu()}, dump)
    return {"peak_extra_mib": peak - base - grad_mib}


def measure_time(variant: str, tokens: int, hidden: int, vocab: int, chunk: int, device: str, dtype: torch.dtype,
                 reps: int) -> dict:
    h, w, tgt = _inputs(tokens, hidden, vocab, device, dtype)
    times = []
    for i in range(reps + 1):  # the first run is a warm-up
        h.grad = w.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _step(variant, h, w, None, tgt, chunk)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "seconds_min": min(times)}


def _child(args: argparse.Namespace, variant: str, vocab: int, tokens: int, chunk: int, measure: str,
           dump: str = "") -> dict:
    env = dict(os.environ)
    if measure == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    cmd = [sys.executable, __file__, "--child", measure, "--variant", variant, "--vocab", str(vocab), "--tokens",
           str(tokens), "--hidden", str(args.hidden), "--chunk", str(chunk), "--reps", str(args.reps), "--device",
           args.device, "--dtype", args.dtype, "--dump", dump]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} {measure} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: a scale-free element-wise comparison."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["32000x4096", "151936x1024"], help="VOCABxTOKENS, e.g. 151936x1024")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunks", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--checkpoint-chunk", type=int, default=1024, help="chunk of the previous implementation "
                    "(0: skip)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--child", choices=["memory", "time"])
    ap.add_argument("--variant")
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--chunk", type=int)
    ap.add_argument("--dump", default="")
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    if args.child:
        sys.path.insert(0, str(ROOT))
        if args.child == "memory":
            res = measure_memory(args.variant, args.tokens, args.hidden, args.vocab, args.chunk, args.device, dtype,
                                 args.dump)
        else:
            res = measure_time(args.variant, args.tokens, args.hidden, args.vocab, args.chunk, args.device, dtype,
                               args.reps)
        print(json.dumps(res))
        return

    variants = [("chunked", c) for c in args.chunks]
    if args.checkpoint_chunk:
        variants.append(("checkpoint", args.checkpoint_chunk))
    if args.device == "cuda":
        variants.append(("triton", 0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            vocab, tokens = (int(x) for x in case.split("x"))
            base_dump = f"{tmp}/baseline.pt"
            base = {**_child(args, "baseline", vocab, tokens, 0, "memory", base_dump),
                    **_child(args, "baseline", vocab, tokens, 0, "time")}
            ref = torch.load(base_dump)
            for variant, chunk in variants:
                dump = f"{tmp}/{variant}.pt"
                res = {**_child(args, variant, vocab, tokens, chunk, "memory", dump),
                       **_child(args, variant, vocab, tokens, chunk, "time")}
                got = torch.load(dump)
                diffs = {k: _max_rel_diff(got[k], ref[k]) for k in ("logp", "dh", "dw")}
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                rows.append({
                    "vocab": vocab, "tokens": tokens, "hidden": args.hidden, "variant": variant,
                    "chunk": chunk or None, "baseline_extra_mib": base["peak_extra_mib"],
                    "variant_extra_mib": res["peak_extra_mib"],
                    "memory_ratio": base["peak_extra_mib"] / max(res["peak_extra_mib"], 1e-9),
                    "baseline_s": base["seconds"], "variant_s": res["seconds"],
                    "time_ratio": res["seconds"] / base["seconds"],
                    "baseline_s_min": base["seconds_min"], "variant_s_min": res["seconds_min"],
                    "max_rel_diff": diffs, "equal": all(d <= tol for d in diffs.values()),
                })
                print(f"  {case} {variant}@{chunk}: {rows[-1]['memory_ratio']:.1f}x less memory, "
                      f"time x{rows[-1]['time_ratio']:.2f}", file=sys.stderr, flush=True)

    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{platform.machine()} CPU, {os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())} thread(s)")
    machine = f"{where}, torch {torch.__version__}, {args.dtype}"
    target = ">= 4x lower extra peak memory, <= 1.0x time, equal values"
    print(f"selective log-prob vs log_softmax+gather, forward+backward ({machine}); target: {target}")
    print("| vocab | tokens | variant | chunk | baseline extra MiB | variant extra MiB | memory (x lower) "
          "| time ratio | equal | target met |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        met = r["memory_ratio"] >= 4 and r["time_ratio"] <= 1.0 and r["equal"]
        r["target_met"] = met
        print(f"| {r['vocab']} | {r['tokens']} | {r['variant']} | {r['chunk'] or '-'} | {r['baseline_extra_mib']:.0f} "
              f"| {r['variant_extra_mib']:.0f} | {r['memory_ratio']:.1f} | {r['time_ratio']:.2f} | {r['equal']} "
              f"| {'yes' if met else 'no'} |")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "logprobs.json").write_text(json.dumps({"machine": machine, "target": target, "hidden": args.hidden,
                                                   "reps": args.reps, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
