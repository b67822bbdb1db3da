"""Running a plan on several ranks: torchrun to start them, and the setup each
rank does before loading its program.

`plait run DIR --nproc N` re-runs the same command on N ranks through
torchrun (PyTorch's elastic launcher, so multi-node options pass through),
whose agent runs in this process, with restarts off: when a rank fails,
torchrun stops the others. The ranks run with Python's -P, so no module in
the working directory (or the artifact) named like one they import is
imported.

Inside, each rank joins the default process group (NCCL on CUDA, gloo on
CPU) and beats into torchrun's rendezvous store from a thread (heartbeat.py),
with where it is. A rank that finds a peer silent for the timeout (stopped,
hung: a busy rank keeps beating) prints one line naming it and where it was
last seen, kills it if it is a local sibling, and exits, so the run ends; a
collective still waiting after twice the timeout fails. At exit a rank marks
itself done and leaves the process group before the interpreter tears down.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from .heartbeat import Heartbeat, failed_op, timeout_seconds


def under_launcher() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


# seconds a collective waits, once this rank joined a launcher's process group
_COLLECTIVE_WAIT: float | None = None


def relaunch(argv: list[str], nproc: int, launcher_args: list[str]) -> int:
    """Run `plait <argv>` on `nproc` local ranks (per node) through torchrun,
    in this process; a failure is summed up in one line (the failed rank
    printed its own error)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(
        [
            f"--nproc-per-node={nproc}",
            "--max-restarts=0",
            *launcher_args,
            "--no-python",
            sys.executable,
            "-u",
            "-P",
            "-m",
            "plait.cli",
            *argv,
        ]
    )
    try:
        with _process_state_kept():
            run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        how = (
            f"was killed by {failure.signal_name()}"
            if failure.exitcode < 0
            else f"exited with code {failure.exitcode}"
        )
        print(
            f"plait: error: rank {rank} {how} first; torchrun stopped the other ranks",
            file=sys.stderr,
        )
        return 1
    return 0


@contextlib.contextmanager
def _process_state_kept():
    """torchrun's agent, run in this process, installs its own signal handlers
    and sets environment variables (OMP_NUM_THREADS) for its children: give
    the caller (a notebook, a test, `plait.cli.main`) its own back."""
    signals = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT]
    handlers = {s: signal.getsignal(s) for s in signals}
    environment = dict(os.environ)
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        os.environ.clear()
        os.environ.update(environment)


def join(device: str, timeout: float | None = None) -> str:
    """Join the process group torchrun prepared; returns this rank's device.
    `timeout`: seconds a peer may stay silent (default $PLAIT_TIMEOUT or 60)."""
    seconds = timeout_seconds(timeout)
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=2 * seconds))
    watch = PeerWatch(seconds) if "MASTER_ADDR" in os.environ else None
    atexit.register(_leave, watch)
    global _COLLECTIVE_WAIT
    _COLLECTIVE_WAIT = 2 * seconds
    sys.excepthook = functools.partial(_collective_error, sys.excepthook)
    return device


def collective_failure(error: BaseException) -> str | None:
    """A collective that failed under the launcher (timed out, lost its peer)
    as one line: the rank, the op, why; None for any other error."""
    if _COLLECTIVE_WAIT is None or not isinstance(error, RuntimeError):
        return None
    if not (isinstance(error, dist.DistError) or "gloo" in str(error) or _in_wait(error)):
        return None
    why = re.sub(r"^\[[^]]*\]\s*", "", str(error).strip().splitlines()[0])  # "[file.cc:78] "
    return (
        f"rank {dist.get_rank()}: a collective failed at {failed_op(error) or 'an unknown op'}: "
        f"{why} (collectives wait at most {_COLLECTIVE_WAIT:g} s: plait run --timeout or "
        "PLAIT_TIMEOUT)"
    )


def _in_wait(error: BaseException) -> bool:
    """Raised while a program waited for a collective (gloo's transport errors,
    as a broadcast's "Application timeout caused pair closure", name none)."""
    from ..backends.collective_wait import wait_released

    frames = traceback.walk_tb(error.__traceback__)
    return any(frame.f_code is wait_released.__code__ for frame, _ in frames)


def _collective_error(previous, kind, error, trace) -> None:
    """sys.excepthook: a failed collective is one line; other errors keep their traceback."""
    line = collective_failure(error)
    if line is None:
        return previous(kind, error, trace)
    print(f"plait: error: {line}", file=sys.stderr)


def _leave(watch: PeerWatch | None) -> None:
    """Mark this rank done (its silence is no failure), then leave the process
    group while the interpreter is whole: a group torn down by the exit
    itself can abort the process after its work is done."""
    if watch is not None:
        watch.done()
    if dist.is_initialized():
        dist.destroy_process_group()


class PeerWatch:
    """Beats this rank into the rendezvous store and watches its peers' beats."""

    def __init__(self, timeout: float):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.timeout = timeout
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.where = f"{host}:{port}"
        self.host = socket.gethostname()
        self.store = dist.TCPStore(
            host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout)
        )
        run = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}.{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.keys = [f"plait/heartbeat/{run}/{r}" for r in range(self.world_size)]
        self.beats = 0
        now = time.monotonic()
        self.seen = {r: ("", now) for r in range(self.world_size) if r != self.rank}
        self.store_ok = now
        self.finished = False
        self.lock = threading.Lock()  # no beat after "done"
        self.heartbeat = Heartbeat(self._beat)
        self.heartbeat.call = "plait run"
        self.heartbeat.start()

    def done(self) -> None:
        self.heartbeat.stop()
        with self.lock:
            self.finished = True
            try:
                self.store.set(self.keys[self.rank], "done")
            except Exception:  # a store already gone: the run is ending anyway
                pass

    def _beat(self, place: str) -> None:
        with self.lock:
            if not self.finished:
                self._check(place)

    def _check(self, place: str) -> None:
        now = time.monotonic()
        try:
            self.beats += 1
            self.store.set(self.keys[self.rank], f"{self.beats}|{os.getpid()}|{self.host}|{place}")
            peers = [r for r in self.seen if self.store.check([self.keys[r]])]
            values = self.store.multi_get([self.keys[r] for r in peers]) if peers else []
            self.store_ok = now
        except Exception:  # the store is slow or gone: only a long silence counts
            if now - self.store_ok > self.timeout:
                _stop(
                    f"rank {self.rank}: the rendezvous store at {self.where} sent no answer "
                    f"for {now - self.store_ok:.0f} s; stopping this rank"
                )
            return
        for rank, value in zip(peers, values):
            value = value.decode()
            if value == "done":
                del self.seen[rank]
            elif value != self.seen[rank][0]:
                self.seen[rank] = (value, now)
        silent = [(r, v, now - t) for r, (v, t) in self.seen.items() if now - t > self.timeout]
        if not silent:
            return
        which = []
        for rank, value, age in silent:
            _, pid, host, place = (value.split("|", 3) + ["", "", "", ""])[:4]
            which.append(
                f"rank {rank} sent no heartbeat for {age:.0f} s (last seen in "
                f"{place or 'starting'})"
            )
            if host == self.host and pid.isdigit():
                _kill_sibling(int(pid))
        _stop(
            f"rank {self.rank}: {'; '.join(which)}: stopped or hung, so the run stops (the "
            f"limit is {self.timeout:g} s: plait run --timeout or PLAIT_TIMEOUT)"
        )


def _kill_sibling(pid: int) -> None:
    """SIGKILL a silent rank started by the same torchrun as this one (SIGTERM,
    torchrun's first try, does not reach a stopped process)."""
    try:
        with open(f"/proc/{pid}/stat") as f:  # "pid (comm) state ppid ..."
            parent = int(f.read().rpartition(")")[2].split()[1])
        if parent == os.getppid():
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, IndexError):  # gone already, or no /proc
        pass


def _stop(message: str) -> None:
    """Exit this rank at once (its main thread may be blocked in a collective)."""
    print(f"plait: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
