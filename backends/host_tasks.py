"""Runs `offload`'s host ops on a background thread, so the host's optimizer
update overlaps the device's work (ZeRO-Offload's overlap).

A program submits each host op in program order (`self.host("submit",
"aten::lerp_.Scalar", args, kwargs)` returns a Future) and goes on; one worker thread runs them in
that order, so an op's host inputs are done when it starts. A device op that
reads a host value waits for it (`"result"`): the write-back of a parameter
waits for its own update only, and copies it to the device while the worker
updates the next. The program waits for every host op before it returns
(`"drain"`), so a step's update is complete (and its errors raised) when the
step is.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch.utils import _pytree as pytree


def _resolved(value):
    return value.result() if isinstance(value, Future) else value


def _call(callee, args, kwargs):
    args, kwargs = pytree.tree_map(_resolved, (args, kwargs))
    with torch.no_grad():  # (grad mode is per thread)
        return callee(*args, **kwargs)


class HostTasks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls: dict = {}  # schema name -> the callee
        self.pending: list[Future] = []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plait-host")

    def add(self, name: str, callee) -> str:
        self.calls[name] = callee
        return name

    def forward(self, action: str, *rest):
        if action == "submit":
            name, args, kwargs = rest
            future = self.pool.submit(_call, self.calls[name], args, kwargs)
            self.pending.append(future)
            return future
        if action == "result":
            return rest[0].result()
        pending, self.pending = self.pending, []  # "drain"
        for future in pending:
            future.result()
        return None
