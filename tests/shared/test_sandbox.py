"""The sandbox (shared/sandbox.py, shared/sandbox_child.py, shared/sandbox_server.py) and the chart harness
(vision_rl/charts/harness.py): results, containment of hostile programs in both modes (forked from a fork
server, spawned), nothing leaked, the fork server's life cycle, identical facts in the sandbox (both modes)
and in-process. `runner_*` (and `prepare`) run INSIDE sandbox children (fork servers), so this module
imports only light modules at top level."""

from __future__ import annotations

import contextlib
import dis
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shared.sandbox import MODES, SandboxLimits, SandboxResult, live_processes, run_many, run_sandboxed

EXEC = "shared.sandbox_child:run_program"
FAST = SandboxLimits(wall_s=5, cpu_s=5, memory_mb=256, max_stdout_kb=4)
CHARTS = SandboxLimits(wall_s=20, memory_mb=768)
ROOT = Path(__file__).resolve().parents[2]
SECRET = "rlft-secret-7f3a9c"


@pytest.fixture(params=MODES)
def mode(request) -> str:
    """Containment must hold for children forked from a fork server and for spawned ones alike."""
    return request.param


@pytest.fixture(scope="module")
def harness():
    from vision_rl.charts import harness

    return harness


def contained(res: SandboxResult, statuses: tuple[str, ...] = ("error",), limit_s: float = FAST.wall_s) -> None:
    """The run failed with one of `statuses`, within its limit (+ margin), and left nothing behind."""
    assert res.status in statuses, (res.status, res.error)
    assert not res.ok and res.error and "\n" not in res.error
    assert res.seconds < limit_s + 1.5
    assert live_processes(res.workdir) == [] and not os.path.exists(res.workdir)


@pytest.fixture
def run_all(mode: str) -> Callable[..., list[SandboxResult]]:
    """run_all(programs, limits=FAST): the programs, two at a time, in `mode`."""
    return lambda programs, limits=FAST: run_many(programs, EXEC, limits, max_workers=2, mode=mode)


# ---------------------------------------------------------------- runners executed in children

def runner_non_json(program: str, ctx) -> dict:
    return {"value": object()} if program == "object" else {"value": float("nan")}


def runner_bad(program: str, ctx) -> list:
    if program == "raise":
        raise RuntimeError("boom\nsecond line")
    return [1, 2]


def runner_huge(program: str, ctx) -> dict:
    return {"blob": b"x" * (3 * 1024 * 1024)} if program == "blob" else {"text": "y" * (3 * 1024 * 1024)}


def runner_forged(program: str, ctx) -> None:
    """A compromised child leaving a malformed result, a symlink or a FIFO, then exiting."""
    os.unlink(".sandbox_result")
    header = {"status": "ok", "error": "", "layers": [], "stdout": "", "blobs": [["image", 10**9]]}
    {"garbage": lambda: Path(".sandbox_result").write_bytes(b'{"status": "ok"}\nnot json\n'),
     "symlink": lambda: os.symlink("/etc/passwd", ".sandbox_result"), "fifo": lambda: os.mkfifo(".sandbox_result"),
     "sizes": lambda: Path(".sandbox_result").write_bytes(json.dumps(header).encode() + b"\n{}\nabc")}[program]()
    os._exit(0)


_HELD: list = []  # files that the fork server of runner_held opened in `prepare`, before any fork


def prepare(options: dict) -> None:
    """Fork-server hook of this module's runners: runner_held's server leaves files open, as a runner may."""
    if "held" in options:
        _HELD.extend([open(options["held"], "rb"), open(options["held"], "ab")])  # noqa: SIM115


def runner_held(program: str, ctx) -> dict:
    reader, writer = _HELD
    ctx.exec_untrusted("", {})
    writer.write(b"tampered")
    writer.flush()
    return {"read": reader.read().decode()}


# ---------------------------------------------------------------- API and plain results

def test_limits_validate_with_one_line_errors():
    for field, bad in [("wall_s", 0), ("wall_s", float("inf")), ("cpu_s", 0.5), ("memory_mb", 8), ("network", 1),
                       ("max_output_mb", 0), ("max_pixels", -1), ("max_stdout_kb", -1), ("max_disk_mb", 1)]:
        with pytest.raises(ValueError, match=rf"^SandboxLimits\.{field} must be [^\n]*$"):
            SandboxLimits(**{field: bad})
    with pytest.raises(ValueError, match="module:function"):
        run_sandboxed("", "no_colon", FAST)


def test_program_output_errors_and_exits(mode, run_all):
    ok = run_sandboxed("import math\nopen('f.txt', 'w').write('hi')\nprint(open('f.txt').read(), math.pi)", EXEC, FAST,
                       mode=mode)
    assert ok.ok and ok.status == "ok" and ok.stdout == "hi 3.141592653589793\n" and ok.result == {}
    assert {"process", "rlimits", "nproc", "audit"} <= set(ok.layers)
    assert live_processes(ok.workdir) == [] and not os.path.exists(ok.workdir)
    cases = {"print(x)": ("error", "NameError: name 'x' is not defined"),
             "x = (": ("error", "SyntaxError: '(' was never closed (<program>, line 1)"),
             "raise ValueError('a\\nb')": ("error", "ValueError: a b"),
             "import sys\nsys.exit(3)": ("error", "SystemExit: 3"),
             "import sys\nsys.exit(0)": ("ok", ""),
             "import os\nos._exit(0)": ("no_output", "exited with code 0 without output")}
    results = run_all(list(cases))
    assert [(r.status, r.error) for r in results] == list(cases.values())


# ---------------------------------------------------------------- time, memory, processes

def test_infinite_loop_and_sleep_hit_the_wall_clock(run_all):
    limits = SandboxLimits(wall_s=1.5, cpu_s=30, memory_mb=256)
    for res in run_all(["while True: pass", "import time\ntime.sleep(100)"], limits):
        contained(res, ("timeout",), limits.wall_s)
        assert res.error == "timed out after 1.5 s" and res.seconds >= 1.5


def test_cpu_limit_even_when_sigxcpu_is_ignored(run_all):
    limits = SandboxLimits(wall_s=10, cpu_s=1, memory_mb=256)
    for res in run_all(["while True: pass",
                        "import signal\nsignal.signal(signal.SIGXCPU, lambda *a: None)\nwhile True: pass"], limits):
        contained(res, ("timeout",), 3.0)
        assert res.error == "cpu time limit of 1 s exceeded"


def test_memory_bombs(run_all):
    for res in run_all(["x = bytearray(10**11)", "x = 'a' * 10**10", "x = []\nwhile True: x.append(bytearray(10**7))"]):
        contained(res, ("memory",))


def test_fork_bombs_are_refused(run_all):
    for res in run_all(["import os\nwhile True: os.fork()", "import os\nos.system(':(){ :|:& };:')",
                        "import os\nwhile True: os.posix_spawn('/bin/sh', ['sh'], {})",
                        "import sys\nsys.modules['posix'].fork()",
                        "import multiprocessing\nwhile True: multiprocessing.Process(target=print).start()",
                        "import subprocess\nsubprocess.Popen(['sh', '-c', ':(){ :|:& };:'])",
                        "import threading\nwhile True: threading.Thread(target=input).start()"]):
        contained(res)
        assert any(w in res.error for w in ("denied", "disabled", "can't start new thread")), res.error


def test_kernel_lock_down_blocks_processes_signals_and_sockets():
    """Layer 4 without the Python guard: what a program that got past the audit hook would meet."""
    probe = (f"import os, socket, sys\nsys.path.insert(0, {str(ROOT)!r})\n"
             "from shared.sandbox_child import lock_down_kernel\nlayers = lock_down_kernel(network=False)\n"
             "def errno(f):\n    try:\n        f()\n    except OSError as e:\n        return e.errno\n    return 0\n"
             "print(layers, errno(os.fork), errno(lambda: os.kill(os.getppid(), 0)), errno(socket.socket),"
             " errno(lambda: os.execv('/bin/true', ['true'])))\n")
    out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=30).stdout
    if "seccomp" not in out:
        pytest.skip(f"seccomp unavailable on this host: {out!r}")
    assert out.strip().endswith("1 1 1 1"), out  # EPERM for fork, kill(parent), socket, exec


# ---------------------------------------------------------------- files, network, signals

def test_audit_hook_decisions(tmp_path, monkeypatch):
    """The hook called directly (not installed): symlinks, '..', bytes, objects, directories, the cap."""
    from shared.sandbox_child import MAX_CREATED, build_audit_hook

    work, lib, home = tmp_path / "work", tmp_path / "lib", tmp_path / "home"
    for d in (work, lib, home):
        d.mkdir()
    (work / "out").symlink_to(home / "secret")
    hook = build_audit_hook(str(work), [str(lib)], network=False)
    monkeypatch.setattr(os, "lstat", lambda *a: pytest.fail("the hook looked os.lstat up"))
    monkeypatch.setattr(os.path, "realpath", lambda p: str(work))
    write, read = os.O_WRONLY | os.O_CREAT, os.O_RDONLY
    for path, flags in [(str(work / "a.png"), write), (b"rel.txt", write), (str(lib / "font.ttf"), read), (7, read)]:
        hook("open", (path, None, flags))
    denied = [(str(home / "secret"), read), ("out", write), (f"{work}/../home/secret", read), (str(lib / "x"), write),
              (str(lib), read), (Path(work / "a"), read), (str(work) + "/\x00", read), (b"/etc/passwd", read)]
    for path, flags in denied:
        with pytest.raises(PermissionError, match="denied"):
            hook("open", (path, None, flags))
    for event, args in [("os.remove", (str(home / "x"),)), ("os.rename", ("a", str(home))), ("code.__new__", ()),
                        ("os.listdir", (str(home),)), ("os.kill", (1, 9)), ("os.chdir", ("/",)), ("socket.connect", ()),
                        ("ctypes.dlopen", ("libc",)), ("import", ("multiprocessing.pool", None, None, None, None))]:
        with pytest.raises(PermissionError, match="denied"):
            hook(event, args)
    with pytest.raises(PermissionError, match=f"more than {MAX_CREATED} files created"):
        for i in range(MAX_CREATED):
            hook("os.mkdir", (str(work / f"d{i}"), 0o777, None))
    functions, pending = {}, [hook]
    while pending:  # it and every function reachable through closures: no global or builtin lookups
        fn = pending.pop()
        functions[fn.__name__] = fn
        pending += [c.cell_contents for c in fn.__closure__ or () if hasattr(c.cell_contents, "__code__")]
        assert not {i.opname for i in dis.get_instructions(fn)} & {"LOAD_GLOBAL", "LOAD_NAME"}, fn.__name__
    assert set(functions) == {"hook", "check", "resolve", "mode_of", "count_creation"}


def test_reading_outside_the_sandbox_fails(tmp_path, run_all):
    (home := tmp_path / "home").mkdir()
    (home / "secret.txt").write_text(SECRET)
    secret = str(home / "secret.txt")
    for res in run_all([f"print(open({secret!r}).read())", f"import os\nprint(os.read(os.open({secret!r}, 0), 99))",
                        f"import pathlib\nprint(pathlib.Path({secret!r}).read_text())",
                        f"import numpy\nprint(numpy.fromfile({secret!r}, dtype='u1').tobytes())",
                        f"import os\nprint(os.listdir({str(home)!r}))", "print(open('/etc/passwd').read())",
                        "print(open('../' * 20 + 'etc/passwd').read())", "import os\nos.chdir('/')",
                        "import os\nos.symlink('/etc/passwd', 'p')\nprint(open('p').read())",
                        "import os\nprint(os.read(os.open('passwd', 0, dir_fd=os.open('/etc', 0)), 99))"]):
        contained(res)
        assert "denied" in res.error and SECRET not in res.stdout and "root:" not in res.stdout, res.error


def test_writing_outside_the_sandbox_fails(tmp_path, run_all):
    target, keep = tmp_path / "out.txt", tmp_path / "keep.txt"
    keep.write_text("intact")
    t, k = str(target), str(keep)
    for res in run_all([f"open({t!r}, 'w').write('x')", f"import os\nos.open({t!r}, os.O_CREAT | os.O_WRONLY)",
                        f"import os\nos.mkdir({t!r})", f"open('a', 'w').write('x')\nimport os\nos.rename('a', {t!r})",
                        f"import shutil\nopen('a', 'w').write('x')\nshutil.copy('a', {t!r})",
                        f"import os\nos.mknod({t!r})", f"import os\nos.mkfifo({t!r})",
                        f"import numpy\nnumpy.save({t!r}, numpy.zeros(3))", f"import os\nos.truncate({k!r}, 0)",
                        f"import os\nos.remove({k!r})"]):
        contained(res)
        assert not target.exists() and not Path(t + ".npy").exists() and keep.read_text() == "intact", res.error


def test_no_network(mode, run_all):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.3)
        port = listener.getsockname()[1]
        for res in run_all([f"import socket\nsocket.socket().connect(('127.0.0.1', {port}))",
                            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
                            "import socket", "import _socket\n_socket.socket()"]):
            contained(res)
        with pytest.raises(socket.timeout):
            listener.accept()
        connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')"
        allowed = run_sandboxed(connect, EXEC, SandboxLimits(wall_s=5, memory_mb=256, network=True), mode=mode)
        assert allowed.ok, allowed.error
        listener.settimeout(2)
        with listener.accept()[0] as conn:
            assert conn.recv(2) == b"hi"


def test_cannot_signal_the_parent(run_all):  # (this process surviving is the other half of the check)
    for res in run_all(["import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
                        "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
                        "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)",
                        "import os, sys\nsys.modules['posix'].kill(os.getppid(), 9)", "import os\nos.killpg(0, 9)"]):
        contained(res)


# ---------------------------------------------------------------- output channel

def _vm_kib(field: str) -> int:
    return next((int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines()
                 if ln.startswith(field + ":")), 0)


def test_huge_stdout_is_truncated_and_parent_memory_bounded(run_all):
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak RSS
    rss = _vm_kib("VmRSS")
    limits = SandboxLimits(wall_s=2, memory_mb=512, max_stdout_kb=4, max_output_mb=2, max_disk_mb=4)
    done, forever, raw = run_all(["for _ in range(20): print('x' * 10**7)", "while True: print('x' * 10**8)",
                                  "import os\nwhile True: os.write(1, b'x' * 10**6)"], limits)
    assert done.ok and len(done.stdout) == 4096 and set(done.stdout) <= {"x", "\n"}
    contained(forever, ("timeout",), limits.wall_s)
    contained(raw, ("error",), limits.wall_s)
    assert "File too large" in raw.error and len(forever.stdout) <= 4096 and len(raw.stdout) <= 4096
    if _vm_kib("VmHWM"):
        assert _vm_kib("VmHWM") - rss < 64 * 1024


def test_disk_quota_and_file_count(run_all):
    limits = SandboxLimits(wall_s=5, memory_mb=256, max_output_mb=2, max_disk_mb=8)
    results = run_all(["i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * 2**20)\n    i += 1",
                       "for i in range(12): open(f'f{i}', 'wb').write(b'x' * 2**20)",
                       "import os\nfor i in range(20000): os.mkdir(f'd{i}')",
                       "for i in range(20000): open(f'f{i}', 'w').close()"], limits)
    for res in results[:2]:
        contained(res, ("output_too_large",), limits.wall_s)
    for res in results[2:]:  # cleanup time grows with the number of entries: capped
        contained(res, ("error",), 2.0)
        assert res.error == "PermissionError: sandbox: more than 256 files created"


@pytest.mark.parametrize("runner, program, status, message", [
    ("runner_non_json", "object", "error", "runner returned non-JSON output: TypeError"),
    ("runner_non_json", "nan", "error", "runner returned non-JSON output: ValueError"),
    ("runner_bad", "list", "error", "runner returned list, not dict"),
    ("runner_bad", "raise", "error", "RuntimeError: boom second line"),
    ("runner_huge", "blob", "output_too_large", "exceeds 1 MB"),
    ("runner_huge", "json", "output_too_large", "exceeds 1 MB"),
    ("runner_forged", "garbage", "no_output", "malformed output"),
    ("runner_forged", "symlink", "no_output", "unreadable output"),
    ("runner_forged", "fifo", "no_output", "not a regular file"),
    ("runner_forged", "sizes", "no_output", "malformed output"),
])
def test_runner_output_is_validated(runner, program, status, message, mode):
    res = run_sandboxed(program, f"tests.shared.test_sandbox:{runner}", SandboxLimits(wall_s=10, max_output_mb=1),
                        mode=mode)
    contained(res, (status,), 10)
    assert message in res.error


def test_missing_layers_are_logged_once(caplog, monkeypatch):
    from shared import sandbox

    monkeypatch.setattr(sandbox, "_warned_layers", set())
    for _ in range(2):  # a host without namespaces, capabilities or seccomp: each missing layer logged once
        sandbox._warn_missing_layers(("process", "rlimits", "nproc", "audit"), FAST)
    assert sorted(r.message.split("'")[1] for r in caplog.records) == ["netns", "nocaps", "seccomp"]


# ---------------------------------------------------------------- concurrency

def test_run_many_is_concurrent_ordered_and_clean(mode):
    limits = SandboxLimits(wall_s=2, cpu_s=10, memory_mb=256)
    programs = ["print(0)", "while True: pass", "print(2)", "import os\nos.fork()",
                "x = bytearray(10**11)", "while True: pass", "print(6)", "import time\ntime.sleep(60)"]
    started, results = time.monotonic(), run_many(programs, EXEC, limits, max_workers=4, mode=mode)
    elapsed = time.monotonic() - started
    assert [r.status for r in results] == ["ok", "timeout", "ok", "error", "memory", "timeout", "ok", "timeout"]
    assert [r.stdout for r in results if r.ok] == ["0\n", "2\n", "6\n"]
    assert elapsed < 2 * limits.wall_s + 1.5  # two waves at worst, never the sum of the limits
    assert all(live_processes(r.workdir) == [] and not os.path.exists(r.workdir) for r in results)


# ---------------------------------------------------------------- the chart harness

BAR_PROGRAM = """
import matplotlib.pyplot as plt
fig, (left, right) = plt.subplots(1, 2)
left.bar(["apples", "pears", "plums"], [3, 1.5, 2], color="tab:red", label="stock")
left.set_title("Fruit")
right.plot([0, 1, 2], [1, 4, 9], color="#00ff00", label="squares")
right.legend()
print("drawn")
"""

RICH_PROGRAM = """
import numpy as np
import matplotlib.pyplot as plt
fig = plt.figure(figsize=(8, 6))
gs = fig.add_gridspec(2, 3)
a, b = fig.add_subplot(gs[0, :2]), fig.add_subplot(gs[0, 2])
c, d = fig.add_subplot(gs[1, 0]), fig.add_subplot(gs[1, 1:])
a.barh(["north", "south"], [5, 7], label="sales"); a.hist([1, 2, 2, 3, 3, 3], bins=3, color="orange")
b.pie([1, 2, 1], labels=["x", "y", "z"], autopct="%1.0f%%")
sc = c.scatter([1, 2, 3], [3, 1, 2], c=[0.1, 0.5, 0.9], cmap="viridis", label="pts"); fig.colorbar(sc, ax=c)
d.stackplot([0, 1, 2], [1, 2, 3], [2, 2, 2]); d.errorbar([0, 1], [1, 2], yerr=0.1, label="err")
d.annotate("peak", (1, 2)); d.text(0.5, 0.5, "note $\\\\alpha$"); d.legend()
fig.suptitle("Rich"); fig.add_axes([0.8, 0.8, 0.1, 0.1]).plot([np.nan, 1.0])
"""


def test_chart_facts_and_image(harness):
    run = harness.render_code(BAR_PROGRAM, CHARTS)
    assert run.ok and run.status == "ok" and run.stdout == "drawn\n", run.error
    f = run.facts
    assert f["n_figures"] == 1 and f["size"] == [320, 240] and harness.valid_facts(f)
    assert {"Fruit", "apples", "pears", "plums", "squares", "0.5", "9"} <= set(f["texts"])
    assert f["layout"] == [[1, 2, 0, 1, 0, 1], [1, 2, 0, 1, 1, 2]]
    assert f["calls"] == {"bar": 1, "plot": 1}
    assert f["colors"]["bar"] == ["#d62728"] * 3 and f["colors"]["line"] == ["#00ff00"]
    assert f["data"] == [{"type": "bar", "label": "stock", "x": ["apples", "pears", "plums"], "y": [3.0, 1.5, 2.0]},
                         {"type": "line", "label": "squares", "x": [0.0, 1.0, 2.0], "y": [1.0, 4.0, 9.0]}]
    assert run.image.shape == (240, 320, 3) and run.image.dtype.name == "uint8"
    assert run.image.min() < 100 and (run.image == 255).mean() > 0.3  # ink on a white figure


def test_sandboxed_and_in_process_facts_are_identical(harness):
    sandboxed, trusted = harness.render_code(RICH_PROGRAM, CHARTS), harness.render_trusted(RICH_PROGRAM)
    assert sandboxed.ok and trusted.ok, (sandboxed.error, trusted.error)
    assert sandboxed.facts == trusted.facts and (sandboxed.image == trusted.image).all()
    f = trusted.facts
    layout = f["layout"]  # colorbar(ax=c) re-grids c (entry 2); the colorbar itself is not listed
    assert len(layout) == 5 and layout[:2] == [[2, 3, 0, 1, 0, 2], [2, 3, 0, 1, 2, 3]]
    assert layout[3:] == [[2, 3, 1, 2, 1, 3], [1, 1, 0, 1, 0, 1]]
    assert f["calls"] == {"annotate": 1, "barh": 1, "errorbar": 1, "hist": 1, "pie": 1, "plot": 1,
                          "scatter": 1, "stackplot": 1, "text": 1}  # no bar from hist, no pcolormesh from colorbar
    assert f["data"][0] == {"type": "bar", "label": "sales", "x": ["north", "south"], "y": [5.0, 7.0]}
    assert {"type": "pie", "label": "", "x": ["x", "y", "z"], "y": [0.25, 0.5, 0.25]} in f["data"]
    assert {"Rich", "peak", "25%", "50%", "note $\\alpha$"} <= set(f["texts"]) and len(f["colors"]["scatter"]) == 3
    assert f["data"][-1]["y"] == [None, 1.0] and len(f["colors"]["fill"]) == 2 and harness.valid_facts(f)


def test_chart_failures(harness, mode):
    runs = harness.render_many(["x = 1", "import matplotlib.pyplot as plt\nplt.plot([1])\n1/0", "plt.plot(",
                                "import numpy\nnumpy.ones((10**6, 10**6))"], CHARTS, mode=mode)
    assert [(r.status, r.error) for r in runs] == [
        ("no_figure", "the program left no figure"), ("error", "ZeroDivisionError: division by zero"),
        ("error", "SyntaxError: '(' was never closed (<program>, line 1)"), ("memory", "MemoryError: out of memory")]
    assert runs[0].facts["n_figures"] == 0 and runs[0].image is None and not runs[0].ok


def test_absurd_figures_are_clamped_or_refused(harness, tmp_path, mode):
    plot = "import matplotlib.pyplot as plt\nplt.figure(figsize=({0}, {0}), dpi=1000)\nplt.plot([1, 2])\n"
    big, huge, saved, escape = harness.render_many([
        plot.format(100), plot.format(10000), plot.format(60) + "plt.savefig('a.png')",
        f"import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.savefig({str(tmp_path / 'x.png')!r})"], CHARTS,
        mode=mode)
    assert big.ok and big.facts["size"] == [2000, 2000] and big.image.shape == (2000, 2000, 3)
    assert (huge.status, huge.error) == ("error", "ChartError: figure too large: 10000 x 10000 in does not fit "
                                                  "4000000 pixels")
    assert saved.status == "memory"  # the program's own 60000 x 60000 savefig hit RLIMIT_AS, not the host
    assert escape.status == "error" and "denied" in escape.error and not (tmp_path / "x.png").exists()


def test_chart_child_cannot_reach_preloaded_process_modules(harness, mode):
    """matplotlib preloads subprocess/_posixsubprocess/socket: their entry points are stubbed."""
    for run in harness.render_many(["import sys\nsys.modules['_posixsubprocess'].fork_exec()",
                                    "import sys\nsys.modules['subprocess']._fork_exec()",
                                    "import sys\nsys.modules['socket'].socket()"], CHARTS, max_workers=3, mode=mode):
        assert run.status == "error" and "disabled" in run.error, run.error


# ---------------------------------------------------------------- the fork server

def _children_of(pid: int) -> list[int]:
    stats = (Path(f"/proc/{p}/stat") for p in os.listdir("/proc") if p.isdigit())
    return [int(st.parent.name) for st in stats if _stat_fields(st)[1:2] == [str(pid)]]


def _stat_fields(path: Path) -> list[str]:  # [state, ppid, ...], [] once gone
    with contextlib.suppress(OSError):
        return path.read_text().rsplit(")", 1)[1].split()
    return []


def _gone(pid: int) -> bool:
    return _stat_fields(Path(f"/proc/{pid}/stat"))[:1] in ([], ["Z"])


def test_fork_server_is_reused_and_matches_spawn_mode(harness):
    from vision_rl.charts.generator import random_chart, spec_to_code

    rng = random.Random(1)
    codes = [spec_to_code(random_chart(rng)) for _ in range(6)] + [RICH_PROGRAM]
    forked, spawned = (harness.render_many(codes, CHARTS, mode=m) for m in ("fork", "spawn"))
    for f, s in zip(forked, spawned):
        assert f.ok and s.ok and f.facts == s.facts and f.image.shape == s.image.shape, (f.error, s.error)
        assert (f.image == s.image).all() and f.stdout == s.stdout
    probe = "import os\nprint(os.getpid(), os.getsid(0), os.getpgid(0))"
    runs = run_many([probe] * 6, EXEC, FAST, max_workers=3) + run_many([probe] * 2, EXEC, FAST, max_workers=1)
    servers = {r.server_pid for r in runs}
    assert len(servers) == 1 and 0 not in servers and all(r.ok for r in runs)
    ids = [tuple(map(int, r.stdout.split())) for r in runs]  # each child: a new process, its own session and group
    assert all(pid == sid == pgid for pid, sid, pgid in ids) and len({i[0] for i in ids}) == len(ids)
    assert not servers & {i[0] for i in ids} and not _children_of(next(iter(servers)))  # all reaped


def test_forked_and_spawned_children_see_the_same_descriptors_and_environment():
    probe = ("import os, stat\nkinds = []\nfor fd in range(256):\n    try:\n        m = os.fstat(fd).st_mode\n"
             "    except OSError:\n        continue\n    kinds.append((fd, stat.S_IFMT(m)))\n"
             "print(kinds, os.environ['HOME'] == os.environ['TMPDIR'] == os.getcwd(), sorted(os.environ))")
    forked, spawned = (run_sandboxed(probe, EXEC, FAST, mode=m) for m in ("fork", "spawn"))
    kinds = [(0, stat.S_IFCHR), (1, stat.S_IFREG), (2, stat.S_IFREG), (3, stat.S_IFREG)]  # /dev/null, out, result
    assert forked.ok and forked.stdout == spawned.stdout, (forked.stdout, spawned.stdout)
    assert forked.stdout.startswith(f"{kinds} True ['HOME', 'LANG',"), forked.stdout  # no socket, no pipe


def test_descriptors_left_open_by_prepare_are_private_in_forked_children(tmp_path):
    (held := tmp_path / "held.txt").write_text("intact")
    runs = run_many(["", ""], "tests.shared.test_sandbox:runner_held", FAST, max_workers=2, options={"held": str(held)})
    assert [r.result for r in runs] == [{"read": "intact"}] * 2 and held.read_text() == "intact"


def test_server_death_fails_in_flight_runs_and_the_next_run_restarts_it():
    first = run_sandboxed("print(1)", EXEC, FAST)
    server = first.server_pid
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_sandboxed, "import time\ntime.sleep(60)", EXEC, SandboxLimits(wall_s=30))
        deadline = time.monotonic() + 10
        while not (children := _children_of(server)) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(server, signal.SIGKILL)
        res = future.result(timeout=20)
    contained(res, ("sandbox_error",), 10)
    assert f"fork server {server} died" in res.error and children and all(_gone(c) for c in children)
    again = run_sandboxed("print(2)", EXEC, FAST)
    assert again.ok and again.stdout == "2\n" and again.server_pid not in (0, server)


def test_fork_server_exits_with_its_parent():
    code = (f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom shared.sandbox import run_sandboxed\n"
            f"print(run_sandboxed('print(1)', {EXEC!r}).server_pid, flush=True)\nos.kill(os.getpid(), 9)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    server = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while not _gone(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(server) and out.returncode == -signal.SIGKILL
