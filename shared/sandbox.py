"""Run untrusted (model-generated) Python in a contained child process; get back only its result.

    res = run_sandboxed(code, "vision_rl.charts.harness:run", SandboxLimits(wall_s=5))  # SandboxResult
    results = run_many(codes, "shared.sandbox_child:run_program", limits, max_workers=4, mode="fork")

Threat model: the program may be buggy (endless loops, huge allocations or prints) or hostile (read
secrets, write outside its directory, open sockets, fork-bomb, signal the trainer, monkeypatch any
module). The parent must survive, stay responsive and leak nothing; the program's only output is what
its runner returns. Layers, from the outside in (1 here, 2-6 in `shared.sandbox_child`):

1. a separate process (`python -I -B`, minimal environment, stdin /dev/null; or forked from a server
   started so) in its own session, in a fresh temporary working directory removed afterwards; the wall
   clock kills the whole process group (SIGKILL), then anything still carrying the run's marker; the disk
   quota is polled.
2. rlimits, set first thing in the child: CPU seconds, address space, file size, open files, no core.
3. a new network namespace (only a down loopback) when the host allows it.
4. kernel lock-down right before the program runs: RLIMIT_NPROC=0, no_new_privs, every capability
   dropped, and a seccomp filter (x86_64, aarch64) failing fork/clone/exec, signals to other processes,
   ptrace, sockets, namespace and mount calls with EPERM (RLIMIT_NPROC alone is not enforced for root).
5. a Python audit hook (it cannot be removed): denies process creation, signals, ctypes, sockets,
   code-object construction, tracing, chdir/chmod/links, more than MAX_CREATED new files, reads
   outside the allowed roots (working directory, the Python installation, matplotlib data and fonts)
   and writes outside the working directory. It only calls references captured when it was built, so
   monkeypatching os, posixpath or builtins cannot change its decisions.
6. callables without audit events (os.fork, _posixsubprocess.fork_exec, pidfd signals, os.mknod ...)
   replaced by stubs that raise.

Layers 5-6 guard Python-level code only: CPython is not a security boundary and an interpreter exploit
defeats them. Layers 1-4 still bound time, memory, processes, signals and network after one; file access
is then bounded only by the user the trainer runs as (run it unprivileged). Layers a host cannot
provide are listed as missing from `SandboxResult.layers` and logged once.

Modes: "fork" (the default) forks each child from a long-lived server per runner that has already
imported the runner's modules (`shared.sandbox_server`; a few ms instead of ~0.5 s of CPU per program);
"spawn" starts a fresh interpreter per program. Either child runs the same code (`sandbox_child.run_job`)
under the same layers, and the parent supervises both alike. The server never runs a program nor locks
itself down; a forked child starts from a copy of its prepared memory, and its process group id stays
reserved until the parent's kill because the server reaps a child only once the parent released it
(details in shared/sandbox_server.py). In fork mode the wall clock and `seconds` start when the server is
ready (its start-up is charged to no program); if it dies, in-flight runs end with "sandbox_error" and the
next run starts a new one.

Statuses: "ok"; "error" (the program or runner raised; `error` is one line such as "NameError: name
'x' is not defined"); "timeout" (wall clock or CPU time); "memory"; "killed" (by a signal);
"no_output" (no readable result); "output_too_large" (result above max_output_mb, disk above
max_disk_mb); "sandbox_error" (the sandbox itself failed). A run never raises for a bad program and
never waits longer than wall_s (plus the kill, and cleanup of at most MAX_CREATED entries).

Output channel: a file of the working directory holding a JSON header line, a JSON result line and the
runner's top-level `bytes` values as blobs; read with O_NOFOLLOW, only if it is a regular file within
max_output_mb, and validated. Linux only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared.sandbox_child import EXIT_MEMORY, PROGRAM_FILE, RESULT_FILE, STDOUT_FILE
from shared.sandbox_server import ForkedRun, child_env, server_for

log = logging.getLogger(__name__)

MODES = ("fork", "spawn")
STATUSES = ("ok", "error", "timeout", "memory", "killed", "no_output", "output_too_large", "sandbox_error")
CHILD_STATUSES = ("ok", "error", "memory", "output_too_large")  # what a child may report itself
EXPECTED_LAYERS = ("netns", "nocaps", "seccomp", "audit")
WORKDIR_PREFIX = "rlft-sbx-"
MAX_DISK_ENTRIES = 1000  # backstop to the child's own cap (sandbox_child.MAX_CREATED)
DISK_POLL_S = 0.05  # disk use may overshoot max_disk_mb by what the child writes in one interval
_CHILD = str(Path(__file__).resolve().with_name("sandbox_child.py"))
_PROJECT_ROOT = str(Path(__file__).resolve().parents[1])
_BOOTSTRAP = (  # load the child module by path: no package __init__ runs in the child
    "import sys, importlib.util as u\n"
    "s = u.spec_from_file_location('shared.sandbox_child', sys.argv[1])\n"
    "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m)\n"
    "m.main(sys.argv[2])\n"
)
_warned_layers: set[str] = set()


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. Memory is address space (RLIMIT_AS); sizes are in MiB / KiB."""

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    max_output_mb: int = 16
    max_pixels: int = 4_000_000
    max_stdout_kb: int = 64
    max_disk_mb: int = 64
    network: bool = False

    def __post_init__(self) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        rules = {
            "wall_s": (lambda v: (is_int(v) or isinstance(v, float)) and 0 < v < math.inf, "a positive number"),
            "cpu_s": (lambda v: is_int(v) and v >= 1, "an int >= 1"),
            "memory_mb": (lambda v: is_int(v) and v >= 32, "an int >= 32"),
            "max_output_mb": (lambda v: is_int(v) and v >= 1, "an int >= 1"),
            "max_pixels": (lambda v: is_int(v) and v >= 1, "an int >= 1"),
            "max_stdout_kb": (lambda v: is_int(v) and v >= 0, "an int >= 0"),
            "max_disk_mb": (lambda v: is_int(v) and v >= self.max_output_mb, "an int >= max_output_mb"),
            "network": (lambda v: isinstance(v, bool), "a bool"),
        }
        for name, (valid, what) in rules.items():
            if not valid(getattr(self, name)):
                raise ValueError(f"SandboxLimits.{name} must be {what}, got {getattr(self, name)!r}")


@dataclass
class SandboxResult:
    """Outcome of one run. `result` is the runner's JSON dict, `blobs` its binary values."""

    ok: bool
    status: str
    error: str = ""
    result: dict | None = None
    blobs: dict[str, bytes] = field(default_factory=dict)
    stdout: str = ""  # the last max_stdout_kb KiB the program printed (stdout and stderr)
    seconds: float = 0.0
    layers: tuple[str, ...] = ()  # isolation layers that were in effect
    workdir: str = ""  # already removed; its path marks the run's processes (see live_processes)
    server_pid: int = 0  # the fork server that forked the child (0: spawn mode)


class _BadOutput(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def run_sandboxed(program: str, runner: str, limits: SandboxLimits | None = None, *,
                  options: Mapping | None = None, mode: str = "fork") -> SandboxResult:
    """Run `program` with `runner` ("module:function", see shared.sandbox_child) in a fresh sandbox child,
    forked by the runner's fork server (mode "fork") or spawned (mode "spawn"). `options` (JSON) reach the
    runner as `ctx.options`. Raises only for a malformed runner, options or mode."""
    limits, options = limits or SandboxLimits(), dict(options or {})
    module, sep, func = runner.partition(":")
    if not sep or not module or not func.isidentifier():
        raise ValueError(f"runner must be 'module:function', got {runner!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    try:
        json.dumps(options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"options must be JSON: {exc}") from None
    started, workdir = time.monotonic(), ""
    try:
        workdir = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
        return _run_in(workdir, program, runner, limits, options, mode)
    except Exception as exc:  # the sandbox's own failure (spawn, fork server, disk ...), never the program's
        log.warning("sandbox failed: %s: %s", type(exc).__name__, exc)
        return SandboxResult(False, "sandbox_error", f"sandbox: {type(exc).__name__}: {exc}",
                             seconds=time.monotonic() - started, workdir=workdir)
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def run_many(programs: Sequence[str], runner: str, limits: SandboxLimits | None = None, max_workers: int = 4,
             *, options: Mapping | None = None, mode: str = "fork") -> list[SandboxResult]:
    """`run_sandboxed` over many programs, `max_workers` at a time (a thread supervises each child; in fork
    mode all go to the runner's one server). Results are in input order."""
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda p: run_sandboxed(p, runner, limits, options=options, mode=mode), programs))


def live_processes(marker: str, *, by_cmdline: bool = True) -> list[int]:
    """Pids of live processes whose working directory lies in `marker` (a run's workdir path, which the
    program cannot leave: chdir is denied) or, if `by_cmdline`, whose command line contains it (spawned
    children and any copy of them; a forked child's command line is its server's)."""
    pids = []
    for entry in os.scandir("/proc") if marker and os.path.isdir("/proc") else ():
        if not entry.name.isdigit():
            continue
        with suppress(OSError):
            cwd = os.readlink(os.path.join(entry.path, "cwd")).removesuffix(" (deleted)")
            if cwd == marker or cwd.startswith(marker + "/") or (
                    by_cmdline and marker.encode() in Path(entry.path, "cmdline").read_bytes()):
                pids.append(int(entry.name))
    return pids


# ---------------------------------------------------------------- one run

class _Spawned:
    """A spawn-mode child: `python -I -B` running sandbox_child.py by path, in its own session. Same
    interface as sandbox_server.ForkedRun: wait_exit(timeout) -> exited, kill_and_reap() -> (code, cpu)."""

    def __init__(self, config: dict, workdir: str) -> None:
        with open(os.path.join(workdir, STDOUT_FILE), "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _BOOTSTRAP, _CHILD, json.dumps(config)],
                                         cwd=workdir, env=child_env(workdir), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, start_new_session=True, close_fds=True)
        self.delay = 0.002

    def wait_exit(self, timeout: float) -> bool:
        """Poll (WNOWAIT: the zombie keeps its process group ours), then sleep with backoff."""
        if os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(max(0.0, min(self.delay, timeout)))
        self.delay = min(self.delay * 2, DISK_POLL_S)
        return False

    def kill_and_reap(self) -> tuple[int, float]:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        return self.proc.returncode, usage.ru_utime + usage.ru_stime


def _run_in(workdir: str, program: str, runner: str, limits: SandboxLimits, options: dict, mode: str
            ) -> SandboxResult:
    Path(workdir, PROGRAM_FILE).write_text(program, encoding="utf-8", errors="replace")
    Path(workdir, STDOUT_FILE).write_bytes(b"")
    config = {"runner": runner, "limits": asdict(limits), "options": options, "workdir": workdir,
              "project_root": _PROJECT_ROOT}
    server = server_for(runner, options, _PROJECT_ROOT) if mode == "fork" else None  # the clock starts after
    started = time.monotonic()
    try:
        child = ForkedRun(server, config) if server else _Spawned(config, workdir)
        reason = None
        try:
            reason = _supervise(child, workdir, limits, started + limits.wall_s)
        finally:
            returncode, cpu = child.kill_and_reap()
    finally:
        _kill_leftovers(workdir, by_cmdline=server is None)
    status, error, header, result, blobs = _classify(reason, returncode, cpu, workdir, limits)
    layers = tuple(header["layers"]) if header else ()
    if header:
        _warn_missing_layers(layers, limits)
    stdout = header["stdout"] if header else _read_tail(os.path.join(workdir, STDOUT_FILE), limits.max_stdout_kb * 1024)
    return SandboxResult(status == "ok", status, error, result, blobs, stdout, time.monotonic() - started,
                         layers, workdir, server.pid if server else 0)


def _supervise(child: ForkedRun | _Spawned, workdir: str, limits: SandboxLimits, deadline: float) -> str | None:
    """Wait for the child to exit, checking the disk quota every DISK_POLL_S and once after it exits;
    None if it finished within its limits, else why not."""
    next_disk, quota = 0.0, limits.max_disk_mb * 1024 * 1024
    while True:
        now = time.monotonic()
        if now >= next_disk:
            if _disk_exceeded(workdir, quota):
                return "disk"
            next_disk = now + DISK_POLL_S
        if child.wait_exit(min(next_disk, deadline) - now):
            return "disk" if _disk_exceeded(workdir, quota) else None
        if time.monotonic() >= deadline:
            return "timeout"


def _kill_leftovers(workdir: str, by_cmdline: bool) -> None:
    """Backstop: SIGKILL whatever still carries the run's marker; wait (at most a second) until it is gone."""
    end = time.monotonic() + 1.0
    while (pids := live_processes(workdir, by_cmdline=by_cmdline)) and time.monotonic() < end:
        for pid in pids:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)


def _disk_exceeded(workdir: str, max_bytes: int) -> bool:
    """More than `max_bytes` allocated under workdir (the stdout file aside; it has RLIMIT_FSIZE), or
    more than MAX_DISK_ENTRIES entries."""
    total, entries, pending = 0, 0, [workdir]
    while pending:
        try:
            with os.scandir(pending.pop()) as it:
                for entry in it:
                    entries += 1
                    if entries > MAX_DISK_ENTRIES:
                        return True
                    info = entry.stat(follow_symlinks=False)
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif entry.path != os.path.join(workdir, STDOUT_FILE):
                        total += info.st_blocks * 512
        except OSError:
            continue
    return total > max_bytes


def _classify(reason: str | None, returncode: int, cpu: float, workdir: str, limits: SandboxLimits
              ) -> tuple[str, str, dict | None, dict | None, dict[str, bytes]]:
    """(status, error, header, result, blobs) of a finished run."""
    if reason == "timeout":
        return "timeout", f"timed out after {limits.wall_s:g} s", None, None, {}
    if reason == "disk":
        return "output_too_large", f"used more than {limits.max_disk_mb} MB or {MAX_DISK_ENTRIES} files of disk", \
            None, None, {}
    try:
        header, result, blobs = _read_result(workdir, limits.max_output_mb * 1024 * 1024)
    except _BadOutput as exc:
        return exc.status, str(exc), None, None, {}
    if header is not None:
        return header["status"], header["error"], header, result, blobs
    sig = -returncode if returncode < 0 else 0
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= limits.cpu_s):
        return "timeout", f"cpu time limit of {limits.cpu_s} s exceeded", None, None, {}
    if sig:
        return "killed", f"killed by signal {sig} ({signal.strsignal(sig)})", None, None, {}
    if returncode == EXIT_MEMORY:
        return "memory", "MemoryError: out of memory", None, None, {}
    last = _read_tail(os.path.join(workdir, STDOUT_FILE), 2048).strip().splitlines()
    detail = f": {' '.join(last[-1].split())[:200]}" if last else ""
    return "no_output", f"exited with code {returncode} without output{detail}", None, None, {}


def _open_regular(path: str) -> tuple[int, int] | None:
    """(fd, size) of a non-empty regular file opened without following links or blocking; None if
    absent or empty (the child creates its result file empty and fills it last)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _BadOutput("no_output", f"unreadable output ({exc.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
        os.close(fd)
        if info.st_size == 0 and stat.S_ISREG(info.st_mode):
            return None
        raise _BadOutput("no_output", "output is not a regular file")
    return fd, info.st_size


def _read_result(workdir: str, cap: int) -> tuple[dict | None, dict | None, dict[str, bytes]]:
    """(header, result, blobs) from the result file; (None, None, {}) if there is none."""
    opened = _open_regular(os.path.join(workdir, RESULT_FILE))
    if opened is None:
        return None, None, {}
    with os.fdopen(opened[0], "rb") as f:
        if opened[1] > cap:
            raise _BadOutput("output_too_large", f"output of {opened[1]} bytes exceeds {cap // 2**20} MB")
        data = f.read(cap + 1)
    try:
        head, result_line, rest = data.split(b"\n", 2)
        header, result = json.loads(head), json.loads(result_line)
        names = [(str(n), int(k)) for n, k in header["blobs"]]
        ok = (header["status"] in CHILD_STATUSES and isinstance(header["error"], str)
              and isinstance(header["stdout"], str) and isinstance(header["layers"], list)
              and (result is None or isinstance(result, dict))
              and all(k >= 0 for _, k in names) and sum(k for _, k in names) == len(rest))
    except (ValueError, TypeError, KeyError, RecursionError):
        ok = False
    if not ok:
        raise _BadOutput("no_output", "malformed output")
    blobs, offset = {}, 0
    for name, length in names:
        blobs[name], offset = rest[offset: offset + length], offset + length
    header["error"], header["layers"] = " ".join(header["error"].split())[:500], [str(x) for x in header["layers"]]
    return header, result, blobs


def _read_tail(path: str, nbytes: int) -> str:
    """The last `nbytes` of a file, decoded leniently ("" if absent, empty or unreadable)."""
    try:
        opened = _open_regular(path)
    except _BadOutput:
        return ""
    if opened is None:
        return ""
    with os.fdopen(opened[0], "rb") as f:
        f.seek(max(0, opened[1] - nbytes))
        return f.read(nbytes).decode("utf-8", "replace") if nbytes > 0 else ""


def _warn_missing_layers(layers: Sequence[str], limits: SandboxLimits) -> None:
    """Log once per process for each isolation layer this host could not provide."""
    guarded = "audit" in layers  # else the runner never ran untrusted code: only netns is known
    for layer in EXPECTED_LAYERS if guarded else ("netns",):
        if layer in layers or layer in _warned_layers or (layer == "netns" and limits.network):
            continue
        _warned_layers.add(layer)
        log.warning("sandbox: isolation layer %r is unavailable on this host; continuing without it "
                    "(see shared/sandbox.py for what the other layers still contain)", layer)
