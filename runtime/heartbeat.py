"""Heartbeats: how a rank shows that it is alive, and where it is.

A thread of the rank beats every INTERVAL seconds whatever its main thread
does (torch ops release the GIL), so a rank busy with a long call keeps
beating, and a rank whose beats stop is stopped (SIGSTOP), hung holding the
GIL, or dead. Each beat says what the main thread is doing: the call, and
the IR op it is running when it is inside a compiled program (found from
its Python frames: the op's plan position and module path).
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
import weakref
from collections.abc import Callable

from ..ir.errors import PlaitError

INTERVAL = 0.5
DEFAULT_TIMEOUT = 60.0


def timeout_seconds(value: float | None = None) -> float:
    """How long a rank may stay silent: `value`, else $PLAIT_TIMEOUT, else 60 s."""
    if value is None:
        text = os.environ.get("PLAIT_TIMEOUT", "")
        try:
            value = float(text) if text else DEFAULT_TIMEOUT
        except ValueError:
            raise PlaitError(f"PLAIT_TIMEOUT={text!r}: expected seconds, e.g. 60") from None
    if not value > 4 * INTERVAL:
        raise PlaitError(
            f"a rank timeout of {value} s is too short; use more than {4 * INTERVAL} s"
        )
    return float(value)


class Heartbeat:
    """Calls `send(place)` every INTERVAL seconds from a daemon thread, where
    `place` says what this process's main thread is doing."""

    def __init__(self, send: Callable[[str], None]):
        self.send = send
        self.call = "starting"  # the rank's loop names its current call here
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="plait-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def place(self) -> str:
        op = current_op(self._main)
        return f"{self.call} at {op}" if op else self.call

    def _run(self) -> None:
        while not self._stop.is_set():
            self.send(self.place())
            self._stop.wait(INTERVAL)


def current_op(thread_id: int | None) -> str | None:
    """The IR op a thread runs inside a compiled program ("plan.mlir:12:5
    (model.layers.0.mlp) plait.all_reduce"), or None outside one."""
    frame, frames = sys._current_frames().get(thread_id), []
    while frame is not None:
        frames.append((frame, frame.f_lineno))
        frame = frame.f_back
    return _op_in(frames)


def failed_op(error: BaseException) -> str | None:
    """The IR op that raised `error`, if a compiled program raised it."""
    return _op_in(list(traceback.walk_tb(error.__traceback__))[::-1])


def _op_in(frames: list) -> str | None:
    """The op at the innermost frame of fx-generated code in `frames`
    ((frame, line) pairs, innermost first) run by a Program."""
    from ..backends.fx import Program

    generated = None
    for frame, line in frames:
        if generated is None and frame.f_code.co_filename.startswith("<eval_with_key>"):
            generated = (frame, line)
        if generated is not None and frame.f_code is Program.__call__.__code__:
            program = frame.f_locals.get("self")  # only `self` and the inputs: no copy kept
            return _op_at(program.graph_module, *generated) if program is not None else None
    return None


_nodes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _op_at(graph_module, frame, line: int) -> str | None:
    from ..backends.fx import OP_META
    from ..ir.text import where

    lines = getattr(graph_module, "_lineno_map", None)  # generated line -> node index
    if frame.f_code is not type(graph_module).forward.__code__ or not lines:
        return None
    index = lines.get(line - frame.f_code.co_firstlineno)
    if graph_module not in _nodes:
        _nodes[graph_module] = list(graph_module.graph.nodes)
    nodes = _nodes[graph_module]
    op = nodes[index].meta.get(OP_META) if index is not None and index < len(nodes) else None
    if op is None:
        return None
    place = where(op)  # "plan.mlir:12:5 (model.layers.0.mlp)", or the op's name
    return place if place == op.name else f"{place} {op.name}"
