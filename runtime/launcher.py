"""Start worker ranks in milliseconds: fork them from one fresh Python that
imported torch and plait once (a zygote), instead of a fresh Python per rank.

A worker pool (workers.py) of N ranks otherwise pays N interpreters importing
torch and plait, seconds each, every time a pool starts. The launcher is one
such fresh `python -P` (it never imports the caller's script either),
started by the first pool of a process and kept for the next ones; each rank
is a fork of it that has imported nothing of the caller's yet. The launcher
runs no torch op and starts no thread, so a fork of it is as clean as a new
interpreter.

The pool sends each rank's setup, its two pipe ends and the caller's stdout
and stderr over a Unix socket; the launcher forks, replies with the pid, and
reports the exit code when the rank exits (it is the rank's parent, so it
reaps it). A launcher serves one environment: the caller's os.environ when it
started (torch reads some variables at import), so a caller whose
environment changed gets a new one. Linux only (pidfds); elsewhere each rank
is a fresh interpreter.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import weakref
from pathlib import Path

from ..ir.errors import PlaitError

AVAILABLE = sys.platform == "linux" and hasattr(os, "pidfd_open")
_MESSAGE = 1 << 20  # bytes: a setup is a few hundred
ANSWER = 120.0  # seconds a fork may wait (the first, for the launcher's imports)

# a fresh interpreter imports this plait (the caller's, wherever it lies) and
# adds no directory to sys.path; -P keeps the working directory off it too.
# argv: plait's __init__.py, then what to run: "launcher" or a rank's setup
START = """\
import importlib.util, sys
spec = importlib.util.spec_from_file_location("plait", sys.argv[1])
sys.modules["plait"] = plait = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plait)
if sys.argv[2] == "launcher":
    from plait.runtime.launcher import serve
    serve(int(sys.argv[3]))
from plait.runtime.rank_worker import main
main(sys.argv[2])
"""
PLAIT = Path(__file__).resolve().parents[1] / "__init__.py"


class LauncherError(PlaitError):
    pass


class Forked:
    """A rank forked by the launcher, with subprocess.Popen's poll/kill/wait."""

    def __init__(self, pid: int, pidfd: int):
        self.pid = pid
        self.pidfd = pidfd  # signals reach this process, never a reused pid
        weakref.finalize(self, os.close, pidfd)
        self.code: int | None = None
        self.exited = threading.Event()

    def poll(self) -> int | None:
        return self.code

    def kill(self) -> None:
        if not self.exited.is_set():
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:  # exited; its report is on the way
                pass

    def wait(self, timeout: float | None = None) -> int | None:
        if not self.exited.wait(timeout):
            raise subprocess.TimeoutExpired(f"worker rank (pid {self.pid})", timeout)
        return self.code


class Launcher:
    """The parent's end: a launcher process and the socket to it."""

    def __init__(self):
        self.environment = dict(os.environ)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-c", START, str(PLAIT), "launcher", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        self.socket = ours
        self.ranks: dict[int, Forked] = {}  # pid -> each rank that has not exited
        self.forked: queue.Queue = queue.Queue()  # the launcher's reply to each fork
        self.lock = threading.Lock()  # one fork request at a time
        threading.Thread(target=self._read, daemon=True, name="plait-launcher").start()

    def fork(self, setup: dict, pipes: tuple[int, int]) -> Forked:
        """A rank running rank_worker.main(setup) on `pipes` (its requests'
        read end, its replies' write end), writing to our stdout and stderr."""
        try:
            cwd = os.getcwd()
        except OSError:  # the caller's directory was removed: the rank starts in the launcher's
            cwd = None
        message = json.dumps({"setup": setup, "cwd": cwd}).encode()
        with self.lock:
            socket.send_fds(self.socket, [message], [*pipes, 1, 2])
            try:
                rank = self.forked.get(timeout=ANSWER)
            except queue.Empty:
                rank = None
        if rank is None:
            raise LauncherError(
                f"the worker launcher (pid {self.process.pid}) exited or did not answer "
                f"in {ANSWER:g} s; its error, if any, is above"
            )
        return rank

    def _read(self) -> None:
        """The launcher's messages, in order: a rank is known here before its
        exit is (it may exit before the pool has looked at it)."""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.socket, _MESSAGE, 1)
            except OSError:
                data = b""
            if not data:  # the launcher is gone: nothing more will fork
                self.forked.put(None)
                return
            message = json.loads(data)
            if "pid" in message:  # with the rank's pidfd (valid after it exits, too)
                rank = self.ranks[message["pid"]] = Forked(message["pid"], fds[0])
                self.forked.put(rank)
                continue
            rank = self.ranks.pop(message["exited"], None)
            if rank is not None:
                rank.code = message["code"]
                rank.exited.set()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


_launchers: list[Launcher] = []
_started = threading.Lock()


def launcher() -> Launcher:
    """The launcher for the caller's environment as it is now (started on first use)."""
    with _started:
        environment = dict(os.environ)
        for each in _launchers:
            if each.alive and each.environment == environment:
                return each
        each = Launcher()
        _launchers.append(each)
        return each


# ---- the launcher process ----------------------------------------------------


def serve(fd: int) -> None:
    """Fork a rank for each request on socket `fd`; report each one's exit.
    Ends when the parent closes the socket (ranks run on: their pipes, not
    this process, tie them to the parent)."""
    import select
    import warnings

    import safetensors.torch  # noqa: F401  (what loading an artifact imports: once, here)
    import torch._dynamo  # noqa: F401  (imported by torch's decompositions that typecheck the IR)

    from .rank_worker import main

    # Ctrl-C in the terminal reaches the whole process group: the pool
    # stops the ranks; the launcher stays for the next pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the only threads are BLAS libraries' idle pools, which handle fork
    warnings.filterwarnings("ignore", message=".*multi-threaded.*fork", category=DeprecationWarning)
    parent = socket.socket(fileno=fd)
    children: dict[int, int] = {}  # pidfd -> pid
    while True:
        ready, _, _ = select.select([parent, *children], [], [])
        for each in ready:
            if each is parent:
                data, fds, _, _ = socket.recv_fds(parent, _MESSAGE, 4)
                if not data:
                    os._exit(0)
                request = json.loads(data)
                _import_entry_point(request["setup"].get("load"))
                pid = os.fork()
                if pid == 0:
                    try:
                        parent.close()
                        for pidfd in children:
                            os.close(pidfd)
                        _become_rank(main, request, fds)
                    finally:  # (main never returns)
                        os._exit(1)
                for fd_ in fds:
                    os.close(fd_)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = pid
                _reply(parent, {"pid": pid}, [pidfd])
            else:
                pid = children.pop(each)
                os.close(each)
                _, status = os.waitpid(pid, 0)
                _reply(parent, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _import_entry_point(entry_point: str | None) -> None:
    """The module of the ranks' entry point ('module:name'), imported here once
    rather than in every fork (plait's api and training load when first used).
    If it does not import, each rank reports why when it tries."""
    if entry_point:
        try:
            importlib.import_module(entry_point.partition(":")[0])
        except Exception:
            pass


def _reply(parent: socket.socket, message: dict, fds: list[int] = ()) -> None:
    try:
        socket.send_fds(parent, [json.dumps(message).encode()], fds)
    except OSError:  # the parent is gone
        os._exit(0)


def _become_rank(main, request: dict, fds: list[int]) -> None:
    """In the fork: the caller's stdout, stderr and directory, then the rank's life."""
    requests, replies, stdout, stderr = fds
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    os.close(stdout)
    os.close(stderr)
    if request["cwd"] is not None:
        os.chdir(request["cwd"])
    main(json.dumps({**request["setup"], "requests": requests, "replies": replies}))
