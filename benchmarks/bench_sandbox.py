"""Sandboxed chart rendering throughput: spawn mode (a fresh interpreter per program) vs fork mode (children
forked from a prepared fork server; shared/sandbox_server.py).

64 generated chart programs (vision_rl.charts.generator, random.Random(0)) rendered by
vision_rl.charts.harness.render_many with max_workers=2; fork mode is timed with its server already
started (a trainer starts it once). Prints programs/second and CPU per program (this process, its
children, the fork server and its children) for both modes, the ratio, and whether both modes gave the
same facts and pixels. On a busy machine wall times grow; CPU per program is the steadier figure.

    OMP_NUM_THREADS=1 python benchmarks/bench_sandbox.py [--n 64] [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.sandbox import SandboxLimits, run_sandboxed
from shared.sandbox_server import shutdown_servers
from vision_rl.charts.generator import random_chart, spec_to_code
from vision_rl.charts.harness import RUNNER, ChartRun, render_many


def cpu_seconds(server_pid: int) -> float:
    """CPU time of this process, its reaped children (spawn mode), the fork server and its reaped children."""
    own = sum(os.times()[:4])
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()
        return own + sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return own


def timed(codes: list[str], mode: str, workers: int, server_pid: int) -> tuple[float, list[ChartRun]]:
    cpu, started = cpu_seconds(server_pid), time.perf_counter()
    runs = render_many(codes, SandboxLimits(wall_s=30), max_workers=workers, mode=mode)
    elapsed, cpu = time.perf_counter() - started, cpu_seconds(server_pid) - cpu
    failed = sum(not r.ok for r in runs)
    print(f"{mode:>5}: {len(codes)} programs in {elapsed:6.2f} s = {len(codes) / elapsed:6.1f} programs/s "
          f"({1000 * elapsed / len(codes):5.1f} ms wall, {1000 * cpu / len(codes):5.1f} ms CPU per program)"
          + (f", {failed} failed" if failed else ""))
    return elapsed, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    rng = random.Random(0)
    codes = [spec_to_code(random_chart(rng)) for _ in range(args.n)]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, max_workers={args.workers}")
    started = time.perf_counter()
    render_many(codes[:1], mode="fork")  # starts the fork server
    print(f"fork server start + first program: {time.perf_counter() - started:.2f} s")
    server_pid = run_sandboxed("", RUNNER).server_pid
    spawn_s, spawned = timed(codes, "spawn", args.workers, server_pid)
    fork_s, forked = timed(codes, "fork", args.workers, server_pid)
    same = all(a.ok and b.ok and a.facts == b.facts and a.image is not None and b.image is not None
               and (a.image == b.image).all() for a, b in zip(spawned, forked))
    print(f"fork / spawn throughput: {spawn_s / fork_s:.1f}x; identical facts and pixels: {same}")
    shutdown_servers()


if __name__ == "__main__":
    main()
