"""Fork-server mode of `shared.sandbox` (its default): one long-lived server process per (runner, parent
process) imports the runner's heavy modules once, then forks one sandbox child per program (a few ms,
instead of ~0.5 s of CPU for a fresh interpreter importing numpy and matplotlib).

    server = server_for(runner, options, project_root)  # started lazily; restarted once it died
    job = ForkedRun(server, config)                      # wait_exit(timeout), kill_and_reap()

The server starts like a spawned child (`python -I -B`, minimal environment, stdin /dev/null, own session,
modules loaded by path) in a private temporary directory (cwd, HOME, MPLCONFIGDIR), imports the runner and
calls the runner module's optional `prepare(options)` (trusted; the options of the call that started it:
the chart harness imports matplotlib, instruments it and renders a warm-up figure). It never runs a program,
so it need not lock itself down (it could not fork if it did). A forked child first leaves the server
behind: setsid (own session and process group), PR_SET_PDEATHSIG=SIGKILL (it dies with the server), the
server's descriptors closed (control socket, wake-up pipe) or made private (any the runner left open),
signal handlers restored, the server's job table cleared, the job's fresh workdir (made by the parent) as
cwd, fds 1 and 2 on the job's stdout file, the job's environment (HOME, TMPDIR, MPLCONFIGDIR in the
workdir; tempfile's cached dir reset). Then it calls `sandbox_child.run_job`, exactly what a spawned child
runs: rlimits, its own network namespace (one unshare), lock-down, stubs, audit hook, program, result
file, os._exit. Layers 2-6 thus apply per program as in spawn mode, and so does layer 1: the parent
supervises the forked child itself (wall clock, group kill, disk polling, output checks, cleanup). A
program also sees a copy-on-write copy of the prepared server (modules, runner name, options; no secrets:
its environment is the minimal one) and shares its hash seed and random states with its siblings
(`random` reseeds at fork, the chart harness reseeds numpy). It cannot reach the server: no descriptor, no
writable shared mapping; signals, ptrace and process_vm_* are denied by seccomp, /proc/<pid>/mem by
capabilities (it has none, the server all), as for the trainer in spawn mode.

Protocol, JSON lines over a socketpair. Parent -> server: run {id, config}, release {id}. Server -> parent:
ready; pid {id, pid} right after the fork (or error {id, error}); exit {id} once the child has exited;
done {id, status, cpu} once reaped (wait4). The server sees exits with waitid(WNOWAIT) and reaps a child
only after its release, sent by the parent once it has SIGKILLed the child (os.kill) and its process group
(os.killpg; same user). Until then the child is alive or an unreaped zombie, which keeps its pid = group id
allocated: no group id is reused before the kill. The parent signals only while the server has not exited
(waitid(WNOWAIT) on it, under the lock with which the reader marks it dead before reaping it); once it is
gone its children were killed by their death signal and reaped by init, and the parent signals nothing.
(Left open: the server dying in the microseconds between that check and the kill, with the child reaped
and its pid reused by a new group leader within them.)

Lifetime: the server exits on EOF of its control socket (the parent closed it or died) or when its parent
pid changes (checked every POLL_S; a forked copy of the parent may hold the socket), after killing and
reaping its children and removing its directory. The parent closes its servers at exit (atexit) and
forgets inherited ones after a fork. When a server dies, in-flight jobs fail with SandboxFailure (status
"sandbox_error") and the next `server_for` starts a new one; one that does not answer within REPLY_S is
killed. Linux only.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import itertools
import json
import logging
import os
import queue
import select
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from shared.sandbox_child import EXIT_NO_RESULT, STDOUT_FILE, _libc, load_runner, one_line, run_job

log = logging.getLogger(__name__)

SERVER_PREFIX = "rlft-sbx-server-"
START_TIMEOUT_S, REPLY_S, POLL_S = 60.0, 10.0, 0.5
PR_SET_PDEATHSIG = 1
_HERE = Path(__file__).resolve().parent
_BOOTSTRAP = (  # load both modules by path: no package __init__ runs in the server
    "import sys, importlib.util as u\n"
    "def load(name, path):\n"
    "    s = u.spec_from_file_location(name, path); m = u.module_from_spec(s)\n"
    "    sys.modules[name] = m; s.loader.exec_module(m); return m\n"
    "load('shared.sandbox_child', sys.argv[1]); load('shared.sandbox_server', sys.argv[2]).serve(sys.argv[3])\n"
)


class SandboxFailure(Exception):
    """The fork server failed (start, crash, no answer): the run ends with status "sandbox_error"."""


def child_env(home: str) -> dict[str, str]:
    """The whole environment of a sandbox child or fork server whose home and temporary dir is `home`."""
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "MPLBACKEND": "Agg", "MPLCONFIGDIR": os.path.join(home, ".matplotlib"), "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1"}


# ---------------------------------------------------------------- server side (its own process)

def _send(fd: int, message: dict) -> None:
    data = json.dumps(message).encode() + b"\n"
    while data:
        data = data[os.write(fd, data):]


def serve(config_json: str) -> NoReturn:
    """The server's main: prepare the runner, then fork a child per job until EOF or the parent is gone."""
    config = json.loads(config_json)
    ctl, parent, me = int(config["fd"]), os.getppid(), os.getpid()
    try:
        load_runner(config["runner"], config["project_root"])
        prepare = getattr(sys.modules[config["runner"].partition(":")[0]], "prepare", None)
        if callable(prepare):
            prepare(dict(config["options"]))
    except BaseException as exc:  # the children import the runner themselves and report the failure
        print(f"fork server: preparing {config['runner']} failed: {one_line(exc)}", file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):  # nothing buffered for a child to flush into its own output
        stream.flush()
    gc.collect()
    gc.freeze()  # fewer copy-on-write faults in the children
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    children: dict[int, list] = {}  # pid -> [job id, exited, released]
    buffer = b""
    try:
        _send(ctl, {"op": "ready"})
        while os.getppid() == parent:
            readable = select.select([ctl, wake_r], [], [], POLL_S)[0]
            with contextlib.suppress(BlockingIOError):
                while wake_r in readable and os.read(wake_r, 4096):
                    pass
            if ctl in readable:
                if not (data := os.read(ctl, 1 << 16)):
                    break
                *lines, buffer = (buffer + data).split(b"\n")
                for message in map(json.loads, lines):
                    if message["op"] == "run":
                        _fork_job(ctl, message, children, (ctl, wake_r, wake_w), me)
                    elif message["op"] == "release":
                        for entry in children.values():
                            entry[2] |= entry[0] == message["id"]
            _reap(ctl, children)
    except OSError:  # the parent went away mid-message
        pass
    finally:
        for pid in children:  # still unreaped: pid and group are ours
            for kill in (os.kill, os.killpg):
                with contextlib.suppress(OSError):
                    kill(pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
        shutil.rmtree(config["dir"], ignore_errors=True)
        os._exit(0)


def _fork_job(ctl: int, message: dict, children: dict, fds: tuple[int, ...], me: int) -> None:
    try:
        pid = os.fork()
    except OSError as exc:
        _send(ctl, {"op": "error", "id": message["id"], "error": f"fork failed: {one_line(exc)}"})
        return
    if pid == 0:
        _enter_job(message["config"], me, fds, children)
    children[pid] = [message["id"], False, False]
    _send(ctl, {"op": "pid", "id": message["id"], "pid": pid})


def _reap(ctl: int, children: dict) -> None:
    """Announce exited children (left unreaped); reap those the parent released."""
    for pid, entry in list(children.items()):
        job, exited, released = entry
        if not exited and os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            entry[1] = exited = True
            if not released:
                _send(ctl, {"op": "exit", "id": job})
        if exited and released:
            _, status, usage = os.wait4(pid, os.WNOHANG)
            del children[pid]
            _send(ctl, {"op": "done", "id": job, "status": status, "cpu": usage.ru_utime + usage.ru_stime})


def _enter_job(config: dict, server_pid: int, fds: tuple[int, ...], children: dict) -> NoReturn:
    """In the forked child: leave the server behind (see the module docstring), then run the job."""
    try:
        os.setsid()
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != server_pid:  # the server died before the death signal was set
            os._exit(EXIT_NO_RESULT)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in fds:
            os.close(fd)
        children.clear()
        os.chdir(config["workdir"])
        out = os.open(STDOUT_FILE, os.O_WRONLY | os.O_NOFOLLOW)
        for fd in (1, 2):
            os.dup2(out, fd)
        os.close(out)
        _privatize_descriptors()
        os.environ.clear()
        os.environ.update(child_env(config["workdir"]))
        tempfile.tempdir = None  # as in a fresh interpreter: found again from TMPDIR
        run_job(config)
    finally:
        os._exit(EXIT_NO_RESULT)


def _privatize_descriptors() -> None:
    """Descriptors the prepared runner left open (e.g. cached font files) are shared with the server and
    every sibling, file offsets included: reopen read-only regular files (a private offset), and point
    anything else at /dev/null, same access mode (whoever holds the number keeps a valid, harmless one)."""
    for fd in sorted(int(n) for n in os.listdir("/proc/self/fd") if int(n) > 2):
        try:
            path, info = os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd)
            with open(f"/proc/self/fdinfo/{fd}") as fdinfo:
                flags = int(next(ln for ln in fdinfo if ln.startswith("flags:")).split()[1], 8)
        except (OSError, StopIteration):  # the descriptor of the listing itself, now closed
            continue
        readable = stat.S_ISREG(info.st_mode) and flags & os.O_ACCMODE == os.O_RDONLY
        try:
            private = os.open(path if readable else os.devnull, flags & os.O_ACCMODE | os.O_NOFOLLOW)
        except OSError:  # e.g. deleted since
            private, readable = os.open(os.devnull, flags & os.O_ACCMODE), False
        if readable:
            os.lseek(private, os.lseek(fd, 0, os.SEEK_CUR), os.SEEK_SET)
        os.dup2(private, fd, inheritable=not flags & os.O_CLOEXEC)
        os.close(private)


# ---------------------------------------------------------------- parent side

class ForkServer:
    """The parent's handle on one server: starts it, reads its messages (a thread), kills pid-checked."""

    def __init__(self, runner: str, options: Mapping, project_root: str) -> None:
        import socket  # not at module level: the server loads this module, and a program's `import socket`
        import subprocess  # or `import subprocess` must stay an (audited) import in a forked child too

        self.runner, self.owner, self.dead, self.closing, self.log_tail = runner, os.getpid(), False, False, ""
        self.lock, self.send_lock, self.ids, self.ready = threading.Lock(), threading.Lock(), itertools.count(), \
            threading.Event()
        self.jobs: dict[int, queue.SimpleQueue] = {}
        self.dir, self.timeout_error = tempfile.mkdtemp(prefix=SERVER_PREFIX), subprocess.TimeoutExpired
        self.sock, theirs = socket.socketpair()
        config = {"runner": runner, "options": dict(options), "project_root": project_root,
                  "fd": theirs.fileno(), "dir": self.dir}
        try:
            with open(os.path.join(self.dir, "server.log"), "wb") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, str(_HERE / "sandbox_child.py"),
                     str(_HERE / "sandbox_server.py"), json.dumps(config)], cwd=self.dir, env=child_env(self.dir),
                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True,
                    pass_fds=(theirs.fileno(),))
        except BaseException:
            self.sock.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        finally:
            theirs.close()
        self.pid = self.proc.pid
        self.reader = threading.Thread(target=self._read_loop, name=f"sandbox-server-{self.pid}", daemon=True)
        self.reader.start()
        if not self.ready.wait(START_TIMEOUT_S) or self.dead:
            self.closing = True
            with self.lock:
                self._kill_server()
            self.reader.join()
            raise SandboxFailure(f"fork server for {runner} did not start{self.log_tail}")

    def alive(self) -> bool:
        with self.lock:
            return self._running()

    def close(self) -> None:
        """Stop the server (EOF on its socket: it kills its children and exits) and wait for it."""
        self.closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(2)  # socket.SHUT_RDWR
        if threading.current_thread() is not self.reader:
            self.reader.join(2 * REPLY_S)

    def kill_job(self, pid: int) -> None:
        """SIGKILL a child and its process group, but only while the server lives (module docstring)."""
        with self.lock:
            if self._running():
                for kill in (os.kill, os.killpg):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        kill(pid, signal.SIGKILL)

    def send(self, message: dict) -> None:
        with self.send_lock:
            try:
                self.sock.sendall(json.dumps(message).encode() + b"\n")
            except OSError:
                raise SandboxFailure(f"fork server {self.pid} is gone") from None

    def unresponsive(self, what: str) -> NoReturn:
        """Kill a server that failed to answer (its children die with it) and fail the job."""
        with self.lock:
            self._kill_server()
        raise SandboxFailure(f"fork server {self.pid} did not answer ({what}) within {REPLY_S:g} s")

    def _running(self) -> bool:  # call with self.lock held: the reader reaps the server only after `dead`
        try:
            return (not self.dead and self.owner == os.getpid()
                    and os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None)
        except ChildProcessError:
            return False

    def _kill_server(self) -> None:  # with self.lock held
        if not self.dead and self.owner == os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # not yet reaped (only the reader reaps, after `dead`)

    def _read_loop(self) -> None:
        buffer = b""
        try:
            while data := self.sock.recv(1 << 16):
                *lines, buffer = (buffer + data).split(b"\n")
                for message in map(json.loads, lines):
                    with self.lock:
                        waiting = self.jobs.get(message.get("id"))
                    if waiting is not None:
                        waiting.put(message)
                    elif message["op"] == "ready":
                        self.ready.set()
        except (OSError, ValueError):
            pass
        with self.lock:
            self.dead, waiting_jobs = True, list(self.jobs.values())
        try:
            self.proc.wait(timeout=REPLY_S)
        except self.timeout_error:
            self.proc.kill()
            self.proc.wait()
        for waiting in waiting_jobs:
            waiting.put({"op": "dead"})
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "server.log"), "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 500))
            tail = " ".join(f.read().decode("utf-8", "replace").split())
            self.log_tail = f": {tail}" if tail else ""
        if not self.closing:
            log.warning("sandbox: fork server %d for %s exited with %s%s", self.pid, self.runner,
                        self.proc.returncode, self.log_tail)
        with self.send_lock:
            self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.ready.set()


class ForkedRun:
    """One job: the server forks a child running `config` (sandbox_child.run_job), which the parent
    supervises like a spawned one."""

    def __init__(self, server: ForkServer, config: dict) -> None:
        self.server, self.pid, self.exited, self.failure = server, None, False, ""
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        with server.lock:
            if server.dead:
                raise SandboxFailure(f"fork server {server.pid} is gone")
            self.id = next(server.ids)
            server.jobs[self.id] = self.queue
        try:
            server.send({"op": "run", "id": self.id, "config": config})
        except BaseException:
            self._forget()
            raise

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the child to exit; True once it has (it stays unreaped)."""
        end = time.monotonic() + timeout
        while not self.exited:
            message = self._next(end - time.monotonic())
            if message is None:
                return False
            if message["op"] == "pid":
                self.pid = int(message["pid"])
            self.exited = message["op"] == "exit"
        return True

    def kill_and_reap(self) -> tuple[int, float]:
        """SIGKILL the child's group, then let the server reap it: (exit code, CPU seconds)."""
        try:
            if self.failure:  # the server is gone (its children died with it) or never forked
                raise SandboxFailure(self.failure)
            end = time.monotonic() + REPLY_S
            while self.pid is None:
                message = self._next(end - time.monotonic())
                if message is None:
                    self.server.unresponsive("fork")
                self.pid = int(message["pid"]) if message["op"] == "pid" else None
            self.server.kill_job(self.pid)
            self.server.send({"op": "release", "id": self.id})
            end = time.monotonic() + REPLY_S
            while (message := self._next(end - time.monotonic())) is None or message["op"] != "done":
                if message is None:
                    self.server.unresponsive("reap")
            return os.waitstatus_to_exitcode(int(message["status"])), float(message["cpu"])
        finally:
            self._forget()

    def _next(self, timeout: float) -> dict | None:
        """The next message for this job, None after `timeout`; raises once the job cannot finish."""
        if not self.failure:
            try:
                message = self.queue.get(timeout=max(0.0, timeout))
            except queue.Empty:
                return None
            if message["op"] == "dead":
                self.failure = f"fork server {self.server.pid} died"
            elif message["op"] == "error":
                self.failure = str(message["error"])
            else:
                return message
        raise SandboxFailure(self.failure)

    def _forget(self) -> None:
        with self.server.lock:
            self.server.jobs.pop(self.id, None)


# ---------------------------------------------------------------- registry

_servers: dict[str, ForkServer] = {}
_registry_lock = threading.Lock()


def server_for(runner: str, options: Mapping, project_root: str) -> ForkServer:
    """This process's server for `runner`, started (`options` go to its `prepare`) if none is alive."""
    with _registry_lock:
        server = _servers.get(runner)
        if server is None or not server.alive():
            if server is not None:
                server.close()
            server = _servers[runner] = ForkServer(runner, options, project_root)
        return server


def shutdown_servers() -> None:
    """Stop every fork server of this process; in-flight jobs end with "sandbox_error". Runs at exit."""
    with _registry_lock:
        servers = list(_servers.values())
        _servers.clear()
    for server in servers:
        server.close()


def _forget_servers() -> None:
    """After a fork of the parent: the servers (and the reader threads) belong to the original."""
    global _registry_lock
    _registry_lock = threading.Lock()
    _servers.clear()


atexit.register(shutdown_servers)
os.register_at_fork(after_in_child=_forget_servers)
