"""One rank of a worker pool (see workers.py): `main(SETUP_JSON)` in a fork
of the launcher (launcher.py), or a fresh `python -P` of its own, which
imported the caller's plait.

A process of its own, so it never imports the caller's script (a script
without a main guard, a notebook, stdin all work), and with -P, so no module
in the working directory shadows one it imports. It joins the pool's
process group, loads the artifact with the function the setup names (the
pool's caller's `load`: the runtime imports nothing above it), and runs the
calls the caller sends down a pipe, while a thread beats (heartbeat.py) the whole time. Messages both
ways are torch.save bytes read with weights_only=True: tensors, numbers,
strings, and lists, tuples and dicts of them.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from .heartbeat import Heartbeat
from .memory import gather
from .workers import pack, unpack

# what the caller may ask for: the model's flat outputs (the caller rebuilds
# their structure), a whole decoding loop, or one program
CALLS = {
    "__call__": lambda compiled, *inputs: list(
        compiled._call(compiled.function.sym_name.data, inputs)
    ),
    "generate": lambda compiled, *args, **options: compiled.generate(*args, **options),
    "run": lambda compiled, function, *inputs: compiled.run(function, *inputs),
    # a Trainer: one step at a learning rate (the caller's schedule), measured
    # or not; whole state; every rank's record of the last measured step
    "train": lambda trainer, batch, lr, measure=False: trainer.run_step(batch, lr, measure),
    "state": lambda trainer: trainer.saved_state(),
    # its pieces of a checkpoint into the staging directory (maybe by a
    # thread), and waiting for them
    "write_pieces": lambda trainer, staging, asynchronous: trainer.write_pieces(
        staging, asynchronous
    ),
    "pieces_written": lambda trainer: trainer.pieces_written(),
    "memory": lambda trainer: gather(trainer.memory(measured=True)),
}


def main(setup: str) -> NoReturn:
    code = _serve(json.loads(setup))
    sys.stdout.flush()
    sys.stderr.flush()
    # no interpreter teardown: the process group's threads need no orderly
    # destruction, and nothing else here has state to save
    os._exit(code)


def _serve(setup: dict) -> int:
    requests = Connection(setup["requests"], writable=False)
    replies = Connection(setup["replies"], readable=False)
    lock = threading.Lock()  # the heartbeat thread and the main thread share the pipe

    def send(*message) -> None:
        data = pack(message)
        with lock:
            replies.send_bytes(data)

    def beat(place: str) -> None:
        try:
            send("beat", place)
        except OSError:  # the caller is gone: nobody will send more calls
            os._exit(1)

    rank, timeout = setup["rank"], setup["timeout"]
    heartbeat = Heartbeat(beat).start()
    try:
        torch.set_num_threads(setup["threads"])
        heartbeat.call = "joining the process group"
        wait = datetime.timedelta(seconds=2 * timeout)  # a silent peer is caught first, by beats
        store = dist.TCPStore("127.0.0.1", setup["port"], is_master=False, timeout=wait)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=setup["world_size"], timeout=wait
        )
        heartbeat.call = "loading the artifact"
        # the custom-op libraries the caller imported, from where it imported them
        sys.path.extend(p for p in setup["paths"] if p not in sys.path)
        # the caller verified the weights (or just wrote them): not again per rank
        load = _imported(setup["load"])  # the pool's caller's: it knows its artifacts
        compiled = load(setup["directory"], trusted_ops=setup["trusted_ops"], verify=False)
    except Exception:
        send("failed", traceback.format_exc())
        return 1
    heartbeat.call = "waiting for a call"
    while True:
        try:
            request = unpack(requests.recv_bytes())
        except EOFError:  # the caller closed the pool
            return 0
        if request is None:
            return 0
        method, args, kwargs = request
        heartbeat.call = method
        try:
            with torch.inference_mode():
                result = CALLS[method](compiled, *args, **kwargs)
                result = pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, result)
            send("done", result if rank == 0 else None)
        except Exception:
            send("failed", traceback.format_exc())
            return 1
        heartbeat.call = "waiting for a call"


def _imported(entry_point: str):
    """The function 'module:name' names."""
    module, _, name = entry_point.partition(":")
    return getattr(importlib.import_module(module), name)
