"""Run a sharded plan from one Python process, e.g. a notebook: one local
worker process per rank (gloo on CPU), started on the first call and reused.

    compiled = plait.compile(model, inputs, pipeline="shard{mesh=tp:2}")
    compiled(*inputs)        # runs on 2 worker processes, returns rank 0's output
    compiled.generate(ids)   # the whole decoding loop runs on every rank
    compiled.close()         # stops them (also when the model is dropped, and at exit)

Each worker runs plait.runtime.rank_worker in a fork of the launcher
(launcher.py): a fresh `python -P` that never imports the caller's script and
imported torch and plait once, so a rank starts in milliseconds. It loads
the plan from an artifact directory: the one the model was loaded from,
else a temporary save that the pool removes when it stops. The pool's TCPStore (in this process) joins
them into a process group. Calls and results go through pipes as
torch.save bytes read with weights_only=True; results are tensors or flat
lists of them, and the caller rebuilds the model's output structure.

Every wait is bounded. Each worker beats every heartbeat.INTERVAL seconds
from a thread, also while busy with a long call; a worker silent for
`timeout` seconds (stopped, hung) or one that exits or raises ends the pool:
every worker is killed and the call raises a WorkerError naming the rank and
where it was last seen (its call and IR op).
"""

from __future__ import annotations

import datetime
import io
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from ..ir.errors import PlaitError
from . import launcher
from .heartbeat import INTERVAL
from .launcher import Forked

STARTUP = 120.0  # seconds a worker may take to start beating (Python, torch, plait imports)


class WorkerError(PlaitError):
    pass


def pack(value) -> bytes:
    """Tensors to bytes for another process (a tensor sent as shared memory
    dies with the process that made it)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def unpack(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerPool:
    """`world_size` worker processes running the artifact at `artifact`, or
    the one `artifact(directory)` saves into a temporary directory (a compiled
    model, a training checkpoint). Each rank loads it, ready for its first
    call, with `load(directory, trusted_ops=..., verify=False)`, a module-level
    function it imports by name (the pool's caller knows how its artifacts
    load; the runtime sits below it)."""

    def __init__(
        self,
        artifact: str | Path | Callable[[Path], object],
        load: Callable[..., object],
        world_size: int,
        timeout: float,
        trusted_ops: tuple[str, ...] = (),
        threads: int | None = None,
    ):
        import torch.distributed as dist

        self.world_size = world_size
        self.timeout = timeout
        self.procs: list[_Rank] = []
        self._events: queue.Queue = queue.Queue()  # (rank, "done" | "failed" | "exited", value)
        scratch = Path(tempfile.mkdtemp(prefix="plait-ranks-")) if callable(artifact) else None
        store = dist.TCPStore(
            "127.0.0.1",
            0,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=2 * timeout),
        )
        # stops the workers and removes the scratch copy on close(), when the
        # pool is dropped, and at interpreter exit
        self._finalizer = weakref.finalize(self, _shut_down, self.procs, scratch, store)
        if scratch is not None:
            artifact(scratch)
        setup = {
            "load": _entry_point(load),
            "world_size": world_size,
            "port": store.port,
            "directory": str(scratch or artifact),
            "threads": threads or max(1, (torch.get_num_threads() or 1) // world_size),
            "timeout": timeout,
            "trusted_ops": list(trusted_ops),  # what the caller imported for the plan's ops
            "paths": _import_roots(trusted_ops),  # where the caller imported them from
        }
        for rank in range(world_size):
            self.procs.append(_Rank.start(rank, setup, self._events))

    def call(self, method: str, args=(), kwargs=None):
        """`compiled.<method>(*args, **kwargs)` on every rank (see
        rank_worker.CALLS); rank 0's result."""
        if not self._finalizer.alive:
            raise WorkerError("the worker pool was stopped; call the model again to restart it")
        request = pack((method, tuple(args), dict(kwargs or {})))
        try:
            for rank in self.procs:
                rank.send(request)
            return self._results()
        except BaseException:  # a failure, or Ctrl-C: the ranks are mid-call, stop them
            self._kill()
            raise

    def _results(self):
        output, done = None, set()
        while len(done) < self.world_size:
            try:
                rank, kind, value = self._events.get(timeout=INTERVAL)
            except queue.Empty:
                now = time.monotonic()
                silent = [r for r in self.procs if now - r.last_beat > r.allowed(self.timeout)]
                if silent:
                    raise WorkerError(self._silence(silent, now)) from None
                continue
            if kind == "done":
                done.add(rank)
                output = value if rank == 0 else output
                continue
            time.sleep(0.2)  # a rank that died is the cause; its peers fail after it
            dead = [r for r in self.procs if r.exitcode is not None and r.rank != rank]
            cause = "".join(f"rank {r.rank} exited (code {r.exitcode}); " for r in dead)
            if kind == "exited":
                code = self.procs[rank].wait()
                raise WorkerError(
                    f"{cause}rank {rank} exited (code {code}; last seen in "
                    f"{self.procs[rank].place})"
                )
            raise WorkerError(f"{cause}rank {rank} failed:\n{value}")
        return output

    def _silence(self, silent: list[_Rank], now: float) -> str:
        which = "; ".join(
            f"rank {r.rank} sent no heartbeat for {now - r.last_beat:.0f} s "
            f"(last seen in {r.place})"
            for r in silent
        )
        return (
            f"{which}: stopped or hung, so all {self.world_size} worker ranks were stopped "
            f"(the limit is {self.timeout:g} s: compiled.call_timeout or PLAIT_TIMEOUT)"
        )

    @property
    def alive(self) -> bool:
        return self._finalizer.alive and all(r.exitcode is None for r in self.procs)

    def _kill(self) -> None:
        for rank in self.procs:
            rank.kill()  # SIGKILL: SIGTERM does not reach a stopped process
        self.close()

    def close(self) -> None:
        self._finalizer()


def _shut_down(ranks: list[_Rank], scratch: Path | None, store) -> None:
    stop = pack(None)
    for rank in ranks:
        if rank.exitcode is None:
            rank.send(stop)
    deadline = time.monotonic() + 5
    for rank in ranks:
        try:
            rank.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rank.kill()
            rank.process.wait()
        rank.requests.close()
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    del store  # (held until now: the workers' process group lives in it)


class _Rank:
    """One worker process, the pipes to it, and what its heartbeats said."""

    def __init__(self, rank: int, process: subprocess.Popen | Forked, requests: Connection):
        self.rank = rank
        self.process = process
        self.requests = requests
        self.last_beat = time.monotonic()  # (or its start)
        self.place = "starting"
        self.beating = False

    def allowed(self, timeout: float) -> float:
        """How long it may be silent: importing torch may take longer than a call's timeout."""
        return timeout if self.beating else max(timeout, STARTUP)

    @classmethod
    def start(cls, rank: int, setup: dict, events: queue.Queue) -> _Rank:
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
        setup = {**setup, "rank": rank, "requests": requests_r, "replies": replies_w}
        try:
            if launcher.AVAILABLE:
                process = launcher.launcher().fork(setup, (requests_r, replies_w))
            else:  # a fresh interpreter of its own
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-P",
                        "-c",
                        launcher.START,
                        str(launcher.PLAIT),
                        json.dumps(setup),
                    ],
                    pass_fds=(requests_r, replies_w),
                    stdin=subprocess.DEVNULL,
                )
        except BaseException:
            os.close(requests_w)
            os.close(replies_r)
            raise
        finally:  # the worker's ends
            os.close(requests_r)
            os.close(replies_w)
        self = cls(rank, process, Connection(requests_w, readable=False))
        replies = Connection(replies_r, writable=False)
        threading.Thread(
            target=self._read, args=(replies, events), daemon=True, name=f"plait-rank{rank}-replies"
        ).start()
        return self

    def _read(self, replies: Connection, events: queue.Queue) -> None:
        """Reads replies as they come, so that no wait on a rank is unbounded."""
        with replies:
            while True:
                try:
                    kind, *value = unpack(replies.recv_bytes())
                except (EOFError, OSError):
                    events.put((self.rank, "exited", None))
                    return
                self.last_beat, self.beating = time.monotonic(), True
                if kind == "beat":
                    self.place = value[0]
                else:
                    events.put((self.rank, kind, value[0]))

    def send(self, data: bytes) -> None:
        """Writes from a thread: a stopped rank does not read, and a full pipe would block."""

        def write() -> None:
            try:
                self.requests.send_bytes(data)
            except OSError:  # it exited; its reader reports that
                pass

        threading.Thread(target=write, daemon=True, name=f"plait-rank{self.rank}-send").start()

    @property
    def exitcode(self) -> int | None:
        return self.process.poll()

    def is_alive(self) -> bool:
        return self.exitcode is None

    def kill(self) -> None:
        if self.exitcode is None:
            self.process.kill()

    def wait(self) -> int:
        try:
            return self.process.wait(5)
        except subprocess.TimeoutExpired:
            return self.process.poll()


def _entry_point(function: Callable) -> str:
    """'module:name' of a module-level function, for a worker to import."""
    where = f"{function.__module__}:{function.__qualname__}"
    if "." in function.__qualname__ or function.__module__ in (None, "__main__"):
        raise WorkerError(f"worker ranks can only import a module-level function, not {where}")
    return where


def _import_roots(modules) -> list[str]:
    """The sys.path entries the caller imported `modules` from: worker ranks
    start without the caller's working directory on their path (-P)."""
    roots = []
    for name in modules:
        file = getattr(sys.modules.get(name), "__file__", None)
        if file is not None:
            path = Path(file).resolve()
            levels = name.count(".") + (path.name == "__init__.py")
            roots.append(str(path.parents[levels]))
    return list(dict.fromkeys(roots))
