"""Run a sharded plan from one Python process, e.g. a notebook: one local
worker process per rank (gloo on CPU), started on the first call and reused.

    compiled = plait.compile(model, inputs, pipeline="shard{mesh=tp:2}")
    compiled(*inputs)        # runs on 2 worker processes, returns rank 0's output
    compiled.generate(ids)   # the whole decoding loop runs on every rank
    compiled.close()         # stops them (also at exit)

Each worker loads the plan from an artifact directory (the one it was loaded
from, or a temporary save), joins a process group, and runs every call it is
sent: a method of its own CompiledModel, whose programs and state (the KV
cache) live as long as the pool. A worker that raises or dies ends the pool: the call raises a
PlaitError naming the rank, and the other workers are stopped.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import queue
import time
import traceback
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from ..ir.errors import PlaitError


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
    def __init__(self, directory: str | Path, world_size: int, threads: int | None = None):
        ctx = mp.get_context("spawn")
        port = free_port()
        self.world_size = world_size
        self.inboxes = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        threads = threads or max(1, (torch.get_num_threads() or 1) // world_size)
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(
                    rank,
                    world_size,
                    port,
                    str(directory),
                    threads,
                    self.inboxes[rank],
                    self.results,
                ),
                daemon=True,
                name=f"plait-rank{rank}",
            )
            for rank in range(world_size)
        ]
        for p in self.procs:
            p.start()

    def call(self, method: str, args=(), kwargs=None, timeout: float = 600.0):
        """`compiled.<method>(*args, **kwargs)` on every rank; rank 0's result."""
        if not self.alive:
            raise WorkerError("the worker pool was stopped; call the model again to restart it")
        payload = pack((method, tuple(args), dict(kwargs or {})))
        for inbox in self.inboxes:
            inbox.put(payload)
        outputs, done, deadline = None, set(), time.monotonic() + timeout
        while len(done) < self.world_size:
            try:
                rank, ok, data = self.results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in done]
                if dead or time.monotonic() > deadline:
                    self.close()
                    if dead:
                        code = self.procs[dead[0]].exitcode
                        why = (f"rank {dead[0]} exited (code {code}); workers are spawned, so a "
                               "script that calls a sharded model must do it under "
                               "`if __name__ == '__main__':`")  # fmt: skip
                    else:
                        why = f"no answer in {timeout:.0f} s"
                    raise WorkerError(f"the call failed on the worker pool: {why}") from None
                continue
            if not ok:
                time.sleep(0.2)  # a rank that died is the cause; its peers fail after it
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                self.close()
                cause = "".join(f"rank {r} exited (code {self.procs[r].exitcode}); " for r in dead)
                raise WorkerError(f"{cause}rank {rank} failed:\n{data}")
            done.add(rank)
            if rank == 0:
                outputs = unpack(data)
        return outputs

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        for inbox, p in zip(self.inboxes, self.procs):
            if p.is_alive():
                inbox.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def _worker(rank, world_size, port, directory, threads, inbox, results) -> None:
    import torch.distributed as dist

    from ..api import load

    try:
        torch.set_num_threads(threads)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        compiled = load(directory)
        _ = compiled.program  # build it (read this rank's weights) before the first call
    except Exception:
        results.put((rank, False, traceback.format_exc()))
        return
    try:
        while (payload := inbox.get()) is not None:
            try:
                method, args, kwargs = unpack(payload)
                with torch.inference_mode():
                    result = getattr(compiled, method)(*args, **kwargs)
                    result = pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, result)
                results.put((rank, True, pack(result) if rank == 0 else b""))
            except Exception:
                results.put((rank, False, traceback.format_exc()))
                return
    finally:
        dist.destroy_process_group()
