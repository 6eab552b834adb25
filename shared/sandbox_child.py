"""Child side of `shared.sandbox` (threat model and layers there): the entry point of the process that
runs one untrusted program, and the in-child guard, layers 2-6.

Order: rlimits (2) and a network namespace (3) first; the runner is imported (its parent packages are
registered without running their `__init__`) and prepares, e.g. imports matplotlib; `ctx.exec_untrusted`
installs the kernel lock-down (4), the stubs (6) and the audit hook (5), irreversibly, and runs the
program; the runner extracts its result under the guard; the result file is written; os._exit. The hook
uses only values and C functions captured when built and never calls methods of program-supplied objects.

Entry (`run_job`): spawn mode runs this file by path (`python -I -B -c <bootstrap> sandbox_child.py
<config>`; `python -m shared.sandbox_child <config>` works too); fork mode calls it in a child forked by
`shared.sandbox_server`, reset there first. A runner "module:function" is called as `function(program,
ctx)`, runs untrusted code through `ctx.exec_untrusted` and returns a dict of JSON values whose top-level
`bytes` values travel as binary blobs.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import importlib.util
import io
import json
import os
import resource
import signal
import struct
import sys
from collections.abc import Callable, Iterable
from typing import NoReturn

PROGRAM_FILE, RESULT_FILE, STDOUT_FILE = "program.py", ".sandbox_result", ".sandbox_stdout"
EXIT_MEMORY, EXIT_NO_RESULT = 3, 4  # exit codes when even the failure report could not be written
MAX_ERROR_CHARS, MAX_CREATED = 500, 256  # error length; files a program may create (cleanup time grows with it)

# Kernel constants (linux/sched.h, linux/prctl.h, linux/seccomp.h, linux/filter.h, linux/audit.h).
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_SECCOMP, PR_CAP_AMBIENT = 38, 24, 22, 47
SECCOMP_MODE_FILTER, CAP_VERSION_3 = 2, 0x20080522
RET_ALLOW, RET_ERRNO_EPERM, RET_KILL_PROCESS = 0x7FFF0000, 0x00050001, 0x80000000
# Denied syscalls per machine (audit arch, x32 guard, always, sockets unless network): process creation and
# exec, signals to others, ptrace/process_vm, namespaces/mount/chroot, mknod/links, io_uring, bpf, perf, keys.
_SYSCALLS = {
    "x86_64": (0xC000003E, True, "56 57 58 59 322 435 62 200 234 129 297 424 434 438 101 310 311 272 308 165 166 "
               "155 161 133 259 88 266 86 265 425 426 427 321 298 323 250 248 249", "41 53 42 49 50 43 288"),
    "aarch64": (0xC00000B7, False, "220 221 281 435 129 130 131 138 240 424 434 438 117 270 271 97 268 40 39 41 51 "
                "33 36 37 425 426 427 280 241 282 219 217 218", "198 199 203 200 201 202 242"),
}
_DENIED_EVENTS = frozenset("""
    os.system os.exec os.posix_spawn os.spawn os.fork os.forkpty subprocess.Popen _posixsubprocess.fork_exec
    os.kill os.killpg signal.pthread_kill sys.addaudithook sys.settrace sys.setprofile gc.get_objects
    gc.get_referrers gc.get_referents code.__new__ resource.setrlimit resource.prlimit os.chdir os.chmod
    os.chown os.chflags os.link os.symlink os.setxattr os.removexattr fcntl.ioctl shutil.chown os.startfile
""".split())
_DENIED_PREFIXES = ("ctypes.", "sqlite3.", "syslog.", "webbrowser.", "winreg.", "_winapi.", "msvcrt.")
_WRITE_EVENTS = frozenset("""
    os.mkdir os.remove os.rename os.rmdir os.truncate os.utime shutil.copyfile shutil.copymode shutil.copystat
    shutil.copytree shutil.move shutil.rmtree shutil.make_archive shutil.unpack_archive tempfile.mkstemp
    tempfile.mkdtemp
""".split())
_LIST_EVENTS = frozenset("os.listdir os.scandir os.fwalk os.walk glob.glob glob.glob/2 os.getxattr os.listxattr "
                         "pathlib.Path.glob pathlib.Path.rglob".split())
_DENIED_IMPORTS = frozenset("""
    ctypes _ctypes multiprocessing _multiprocessing _posixsubprocess subprocess pty tty termios sqlite3 _sqlite3
    dbm _dbm _gdbm webbrowser torch _testcapi _testinternalcapi _xxsubinterpreters
""".split())
_NETWORK_IMPORTS = frozenset("socket _socket ssl _ssl asyncio".split())  # denied unless network=True
_OS_SCRUB = """fork forkpty system popen execv execve execl execle execlp execlpe execvp execvpe spawnv spawnve
    spawnvp spawnvpe spawnl spawnle spawnlp spawnlpe posix_spawn posix_spawnp kill killpg pidfd_open setsid
    setpgid mknod mkfifo chroot"""
_SCRUB = {  # "module": "callables" without (sufficient) audit events, replaced by stubs that raise
    "os": _OS_SCRUB, "posix": _OS_SCRUB, "_posixsubprocess": "fork_exec", "pty": "fork spawn",
    "subprocess": "Popen run call check_call check_output getoutput getstatusoutput _fork_exec",
    "signal": "pidfd_send_signal pthread_kill", "_signal": "pidfd_send_signal pthread_kill"}
_SCRUB_NETWORK = {"socket": "socket socketpair create_connection create_server fromfd", "_socket": "socket socketpair"}


# ---------------------------------------------------------------- process layers (2-4)

def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _set_rlimit(which: int, soft: int, hard: int | None = None) -> None:
    """Lower a limit to (soft, hard), never above the current hard limit (raising it would fail)."""
    hard, current = soft if hard is None else hard, resource.getrlimit(which)[1]
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(which, (soft, hard))


def apply_rlimits(limits: dict) -> None:
    """Layer 2: CPU (SIGXCPU at cpu_s, SIGKILL a second later), memory, file size, open files, no core."""
    mb, cpu, r = 1024 * 1024, int(limits["cpu_s"]), resource
    for which, soft, hard in ((r.RLIMIT_CORE, 0, 0), (r.RLIMIT_CPU, cpu, cpu + 1), (r.RLIMIT_NOFILE, 256, 256),
                              (r.RLIMIT_AS, int(limits["memory_mb"]) * mb, int(limits["memory_mb"]) * mb),
                              (r.RLIMIT_FSIZE, int(limits["max_output_mb"]) * mb, int(limits["max_output_mb"]) * mb)):
        _set_rlimit(which, soft, hard)


def enter_network_namespace() -> bool:
    """Layer 3: a fresh network namespace (as root; else via a user namespace). False if refused."""
    libc = _libc()
    return any(libc.unshare(flags) == 0 for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET))


def seccomp_program(network: bool) -> list[tuple[int, int, int, int]] | None:
    """BPF (code, jt, jf, k): kill on a foreign arch, EPERM for denied (and x32) syscalls, allow the rest."""
    if os.uname().machine not in _SYSCALLS:
        return None
    arch, x32, denied, sockets = _SYSCALLS[os.uname().machine]
    numbers = (denied if network else denied + " " + sockets).split()
    checks = ([(0x35, 0x40000000)] if x32 else []) + [(0x15, int(nr)) for nr in numbers]  # JGE, JEQ
    errno_at = 3 + len(checks) + 1  # after the checks: RET ALLOW, RET ERRNO, RET KILL
    prog = [(0x20, 0, 0, 4), (0x15, 0, errno_at - 1, arch), (0x20, 0, 0, 0)]  # LD arch, JEQ, LD nr
    prog += [(op, errno_at - i - 1, 0, k) for i, (op, k) in enumerate(checks, start=3)]
    return prog + [(0x06, 0, 0, RET_ALLOW), (0x06, 0, 0, RET_ERRNO_EPERM), (0x06, 0, 0, RET_KILL_PROCESS)]


def lock_down_kernel(network: bool) -> list[str]:
    """Layer 4; returns the sub-layers that took effect ("nproc" always, "nocaps", "seccomp")."""
    _set_rlimit(resource.RLIMIT_NPROC, 0)
    libc, layers = _libc(), ["nproc"]
    no_new_privs = libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0  # required by seccomp
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last capability: ignored
    libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
    if libc.capset((ctypes.c_uint32 * 2)(CAP_VERSION_3, 0), (ctypes.c_uint32 * 6)()) == 0:
        layers.append("nocaps")
    prog = seccomp_program(network)
    if no_new_privs and prog:  # struct sock_fprog {u16 len; sock_filter *filter} (64-bit little-endian)
        filters = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *ins) for ins in prog))
        fprog = (ctypes.c_uint64 * 2)(len(prog), ctypes.addressof(filters))
        if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) == 0:
            layers.append("seccomp")
    return layers


# ---------------------------------------------------------------- Python-level guard (5-6)

def scrub_modules(network: bool) -> None:
    """Layer 6: replace process/signal/socket callables of already-imported modules by raising stubs."""
    def disabled(name: str) -> Callable[..., None]:
        def stub(*_args: object, **_kwargs: object) -> None:
            raise PermissionError(f"sandbox: {name} is disabled")
        return stub

    for module_name, names in (_SCRUB if network else {**_SCRUB, **_SCRUB_NETWORK}).items():
        module = sys.modules.get(module_name)
        for name in [n for n in names.split() if hasattr(module, n)] if module is not None else ():
            setattr(module, name, disabled(f"{module_name}.{name}"))


def build_audit_hook(workdir: str, read_roots: Iterable[str], network: bool) -> Callable[[str, tuple], None]:
    """Layer 5. Paths are judged after resolving symlinks, relative ones against the workdir (chdir is
    denied); directories outside the workdir cannot be opened, so no dir_fd points outside it."""
    lstat, readlink, T, REPR, decode = os.lstat, os.readlink, type, repr, bytes.decode
    STR, BYTES, INT, NONE, BOOL, FLOAT, TUPLE = str, bytes, int, type(None), bool, float, tuple
    Denied, Errors = PermissionError, (OSError, ValueError)
    home = os.path.realpath(workdir)
    write_roots = (frozenset({home}), (home + "/",))
    roots = {os.path.realpath(r) for r in (*read_roots, home) if r} - {"/"}
    read_roots_ = (frozenset(roots), tuple(r + "/" for r in roots))
    write_flags, create_flag = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, os.O_CREAT
    created, max_created = [0], MAX_CREATED  # a counter only this closure can reach
    denied, write_events, list_events = _DENIED_EVENTS, _WRITE_EVENTS, _LIST_EVENTS
    prefixes = _DENIED_PREFIXES + (() if network else ("socket.",))
    denied_imports = _DENIED_IMPORTS if network else _DENIED_IMPORTS | _NETWORK_IMPORTS

    def mode_of(path: str) -> int:
        try:
            return lstat(path).st_mode & 0o170000
        except Errors:
            return 0

    def resolve(path: str) -> str | None:
        """Absolute symlink-free form of a path, or None."""
        pending, done, links = (path if path[0] == "/" else home + "/" + path).split("/")[::-1], "", 0
        while pending:
            part = pending.pop()
            if part == "..":
                done = done.rpartition("/")[0]
            elif part and part != "." and mode_of(done + "/" + part) != 0o120000:
                done = done + "/" + part
            elif part and part != ".":
                links, target = links + 1, readlink(done + "/" + part)
                done = "" if target[:1] == "/" else done
                pending.extend(target.split("/")[::-1])
                if links > 40:
                    return None
        return done or "/"

    def check(event: str, args: tuple, roots: tuple, dirs_inside: bool = False) -> None:
        """Every path among `args` (str or bytes; fds and defaults pass) must lie under `roots`."""
        for path in args:
            kind = T(path)
            if kind is INT or kind is NONE or kind is BOOL or kind is FLOAT or kind is TUPLE:
                continue
            text = decode(path, "utf-8", "surrogateescape") if kind is BYTES else path
            real = resolve(text) if T(text) is STR and text and "\x00" not in text else None
            exact, prefix = write_roots if real and dirs_inside and mode_of(real) == 0o040000 else roots
            if real is None or not (real in exact or real.startswith(prefix)):
                shown = REPR(path) if kind is STR or kind is BYTES else "<object>"
                raise Denied("sandbox: " + event + " of " + shown + " denied")

    def count_creation() -> None:
        created[0] += 1
        if created[0] > max_created:
            raise Denied("sandbox: more than " + REPR(max_created) + " files created")

    def hook(event: str, args: tuple) -> None:
        if event in denied or event.startswith(prefixes):
            raise Denied("sandbox: " + event + " denied")
        if event == "open":
            flags = args[2]
            writing = T(flags) is not INT or flags & write_flags
            check(event, args[:1], write_roots if writing else read_roots_, dirs_inside=not writing)
            if T(flags) is not INT or flags & create_flag:
                count_creation()
        elif event in write_events:
            check(event, args, write_roots)
            if event == "os.mkdir":
                count_creation()
        elif event in list_events:
            check(event, args, read_roots_)
        elif event == "import" and T(args[0]) is STR and args[0].partition(".")[0] in denied_imports:
            raise Denied("sandbox: import of " + args[0] + " denied")

    return hook


# ---------------------------------------------------------------- context given to runners

class TailStream(io.TextIOBase):
    """sys.stdout and sys.stderr of the child: keeps the last `keep` characters (sent with the result)
    and mirrors the first `keep` to fd 1 (read by the parent when the child dies without a result)."""

    encoding = "utf-8"

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.keep, self.total, self.tail, self._mirrored = keep, 0, "", 0

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self.total += len(text)
        self.tail = (self.tail + text[-self.keep:])[-self.keep:] if self.keep else ""
        if self._mirrored < self.keep:
            chunk = text[: self.keep - self._mirrored]
            self._mirrored += len(chunk)
            with contextlib.suppress(OSError):
                os.write(1, chunk.encode("utf-8", "replace"))
        return len(text)


def one_line(exc: BaseException) -> str:
    """'TypeName: message' on one line, at most MAX_ERROR_CHARS long."""
    try:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except Exception:  # a hostile __str__
        text = type(exc).__name__
    return " ".join(text.split())[:MAX_ERROR_CHARS]


class SandboxContext:
    """What a runner sees: the working directory, limits and options, and `exec_untrusted`."""

    def __init__(self, config: dict, layers: list[str]) -> None:
        self.workdir, self.limits, self.options = config["workdir"], config["limits"], config["options"]
        paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path]  # not the project
        roots = {os.path.realpath(p) for p in paths if p and os.path.exists(p)}
        roots.discard(os.path.realpath(config["project_root"]))
        self.layers, self.read_roots = layers, sorted(roots) + ["/dev/null", "/dev/urandom"]
        self.output = TailStream(int(self.limits["max_stdout_kb"]) * 1024)
        self.status, self.error, self.guarded = "ok", "", False

    def allow_read(self, *paths: str) -> None:
        """Add read roots (e.g. font directories); only before the guard is installed."""
        if self.guarded:
            raise RuntimeError("sandbox: read roots are fixed once the guard is installed")
        self.read_roots.extend(os.path.realpath(p) for p in paths if p)

    def fail(self, status: str, error: str) -> None:
        """Record the first failure (later ones are consequences)."""
        if self.status == "ok":
            self.status, self.error = status, error

    def exec_untrusted(self, program: str, namespace: dict) -> bool:
        """Install layers 4-6 (once, irreversibly), run the program; False (failure recorded) if it raised."""
        if not self.guarded:
            network, self.guarded = bool(self.limits["network"]), True
            self.layers += lock_down_kernel(network)
            scrub_modules(network)
            sys.addaudithook(build_audit_hook(self.workdir, self.read_roots, network))
            self.layers.append("audit")
        try:
            exec(compile(program, "<program>", "exec"), namespace)
            return True
        except SystemExit as exc:
            if exc.code in (None, 0):
                return True
            self.fail("error", one_line(exc))
        except MemoryError:
            namespace.clear()  # free what the program holds so the report can be written
            self.fail("memory", "MemoryError: out of memory")
        except BaseException as exc:
            self.fail("error", one_line(exc))
        return False


def run_program(program: str, ctx: SandboxContext) -> dict:
    """Generic runner: execute the program as __main__; its output is its stdout (and its status)."""
    ctx.exec_untrusted(program, {"__name__": "__main__"})
    return {}


# ---------------------------------------------------------------- loading, output, main

def register_parents(module_name: str) -> None:
    """Register the parent packages of `module_name` without running their __init__ (they may import torch)."""
    parts = module_name.split(".")
    for i in range(1, len(parts)):
        name, parent = ".".join(parts[:i]), sys.modules.get(".".join(parts[: i - 1]))
        found = None if name in sys.modules else importlib.machinery.PathFinder.find_spec(
            name, getattr(parent, "__path__", None))
        if found is not None:
            sys.modules[name] = importlib.util.module_from_spec(found)
            if parent is not None:
                setattr(parent, parts[i - 1], sys.modules[name])


def encode_result(ctx: SandboxContext, value: object) -> bytes:
    """A header line (status, error, layers, stdout, blob sizes), a result line (JSON), then the blobs
    (the value's top-level bytes). A value that is not such a dict, or exceeds max_output_mb, fails."""
    result, blobs = "null", []
    if isinstance(value, dict):
        blobs = [(str(k), v) for k, v in value.items() if isinstance(v, bytes)]
        try:
            result = json.dumps({k: v for k, v in value.items() if not isinstance(v, bytes)}, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            ctx.fail("error", "runner returned non-JSON output: " + one_line(exc))
            blobs = []
    elif value is not None:
        ctx.fail("error", f"runner returned {type(value).__name__}, not dict")

    def encoded() -> bytes:
        header = {"status": ctx.status, "error": ctx.error, "layers": ctx.layers, "stdout": ctx.output.tail,
                  "stdout_chars": ctx.output.total, "blobs": [[k, len(b)] for k, b in blobs]}
        return b"".join([json.dumps(header).encode(), b"\n", result.encode(), b"\n", *(b for _, b in blobs)])

    data, cap = encoded(), int(ctx.limits["max_output_mb"]) * 1024 * 1024
    if len(data) > cap:
        ctx.status, ctx.error = "output_too_large", f"output of {len(data)} bytes exceeds {cap // 2**20} MB"
        result, blobs, ctx.output = "null", [], TailStream(0)
        data = encoded()
    return data


def load_runner(runner: str, project_root: str) -> Callable[[str, SandboxContext], object]:
    """The function of a runner "module:function"; parent packages are registered, not initialised."""
    if project_root not in sys.path:
        sys.path.append(project_root)
    module_name, _, func_name = runner.partition(":")
    for name in ("shared.sandbox_child", module_name):  # runners may import shared.*: skip its __init__
        register_parents(name)
    return getattr(importlib.import_module(module_name), func_name)


def run_job(config: dict) -> NoReturn:
    """Run one sandboxed program as described by the parent's config, from its working directory
    (spawned: `main`; forked: `shared.sandbox_server`); always ends with os._exit."""
    apply_rlimits(config["limits"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past RLIMIT_FSIZE fail with EFBIG instead
    netns = not config["limits"]["network"] and enter_network_namespace()
    ctx = SandboxContext(config, ["process", "rlimits"] + (["netns"] if netns else []))
    sys.stdout = sys.stderr = sys.__stdout__ = sys.__stderr__ = ctx.output
    result_file = open(RESULT_FILE, "wb")  # opened before the guard: writing it needs no permission later
    value: object = None
    try:
        with open(PROGRAM_FILE, encoding="utf-8") as f:
            program = f.read()
        value = load_runner(config["runner"], config["project_root"])(program, ctx)
    except MemoryError:
        ctx.fail("memory", "MemoryError: out of memory")
    except BaseException as exc:  # the runner's own failure (or the program's, escaping the runner)
        ctx.fail("error", one_line(exc))
    try:
        data, fd = encode_result(ctx, value), result_file.fileno()
        os.ftruncate(fd, 0)
        code = 0 if os.pwrite(fd, data, 0) == len(data) else EXIT_NO_RESULT
    except MemoryError:
        code = EXIT_MEMORY
    except BaseException:
        code = EXIT_NO_RESULT
    os._exit(code)  # no atexit handlers or lingering threads of the program


def main(config_json: str) -> None:
    """Spawn-mode entry: `config_json` is the parent's config."""
    run_job(json.loads(config_json))


if __name__ == "__main__":
    main(sys.argv[1])
