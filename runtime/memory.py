"""Measure the memory a program run allocates, by kind (off unless asked for).

    record = measure(program, inputs, value_kinds(fn))
    record["peak"]                 # bytes of tensor storage alive at once, at most
    record["saved activations"]    # of them, what the forward kept for backward

The program runs through torch.fx's Interpreter, which frees each value after
its last use as the generated code does, under a TorchDispatchMode that sees
every ATen call's results: a result whose storage is new is an allocation
(a view or an in-place update returns a storage already counted), and
`weakref.finalize` on the storage says when it is freed. A storage handed to
a collective is freed when its last (strong) reference goes, which is when its
memory goes too, though a work's weak reference can keep its Python object, and
so its finalizer, alive for a while (on the collective's worker thread): those
are looked at before each allocation instead. The storages the
program holds before it runs (its state, weights, arena) and its inputs are
counted from the start. Each allocation is of the kind of the IR value
(`plait.ir.training.value_kinds`) whose node made it; one a node makes and
does not return is temporary. The kinds are those alive at the peak.

On CUDA the peak is the caching allocator's (torch.cuda.max_memory_allocated):
what kernels allocate for themselves (workspaces) is in it and in no kind,
so it is given as "unattributed"; on CPU, which has no allocator counter,
that is 0.

Host memory (`offload`'s optimizer state, and its update's results where it
runs in line; on its background thread the mode does not see them) is counted
by kind ("optimizer state (host)", "host temporary") but is no part of the
peak, which is the device's: on CPU too, where the two are the same memory,
so that what offload moves off the device shows.
"""

from __future__ import annotations

import operator
import threading
import weakref

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from xdsl.ir import SSAValue

from ..backends.fx import OP_META, PARAM_META, Program
from ..ir.memory import on_host
from ..ir.training import (
    ACCUMULATORS,
    HOST_KINDS,
    HOST_TEMPORARY,
    INPUTS,
    MEMORY_KINDS,
    OPTIMIZER_STATE,
    PARAMETERS,
    SAVED,
    TEMPORARY,
)

PEAK = "peak"
UNATTRIBUTED = "unattributed"
FIELDS = (PEAK, *MEMORY_KINDS, UNATTRIBUTED)  # a record's keys, in this order


def _storages(value):
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            yield leaf.untyped_storage()


class Storages(TorchDispatchMode):
    """Live tensor storages by kind while active: each counted once, from its
    first appearance (`add`, or an ATen call's result) until it is freed."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, list] = {}  # id(storage) -> [bytes, kind, finalizer]
        self._lock = threading.RLock()  # a collective's thread may free a storage
        self._handed: dict[int, StorageWeakRef] = {}  # storages a collective was given
        self.by_kind = dict.fromkeys(MEMORY_KINDS, 0)
        self.current = self.peak = 0  # device bytes
        self.at_peak = dict(self.by_kind)
        self.allocating = TEMPORARY  # the kind of what ATen calls allocate now

    def add(self, storage: torch.UntypedStorage, kind: str) -> None:
        key = id(storage)  # (the wrapper lives as long as the storage does)
        with self._lock:
            if key in self._live:
                return
            self._sweep_handed()
            size = storage.nbytes()
            self._live[key] = [size, kind, weakref.finalize(storage, self._freed, key)]
            self.by_kind[kind] += size
            if kind in HOST_KINDS:
                return
            self.current += size
            if self.current > self.peak:
                self.peak, self.at_peak = self.current, dict(self.by_kind)

    def label(self, storage: torch.UntypedStorage, kind: str) -> None:
        """A temporary storage turns out to hold a value of `kind`."""
        with self._lock:
            entry = self._live.get(id(storage))
            if entry is not None and entry[1] == TEMPORARY and kind not in (TEMPORARY, *HOST_KINDS):
                self.by_kind[TEMPORARY] -= entry[0]
                self.by_kind[kind] += entry[0]
                entry[1] = kind

    def _freed(self, key: int) -> None:
        with self._lock:
            self._handed.pop(key, None)
            size, kind, _ = self._live.pop(key)
            self.by_kind[kind] -= size
            if kind not in HOST_KINDS:
                self.current -= size

    def _hand(self, storage: torch.UntypedStorage) -> None:
        """`storage` goes to a collective: its memory is freed with its last
        reference, which a weak reference (ours, the work's) does not keep."""
        with self._lock:
            if id(storage) in self._live:
                self._handed.setdefault(id(storage), StorageWeakRef(storage))

    def _sweep_handed(self) -> None:
        for key, ref in list(self._handed.items()):
            if ref.expired():
                self._live[key][2].detach()
                self._freed(key)

    def close(self) -> None:
        """Stop watching the storages still alive."""
        with self._lock:
            for _, _, finalizer in self._live.values():
                finalizer.detach()
            self._live.clear()
            self._handed.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for storage in _storages(out):
            self.add(storage, self.allocating)
        if getattr(func, "namespace", None) == "_c10d_functional":
            for storage in _storages((args, out)):
                self._hand(storage)
        return out


class _Labelled(torch.fx.Interpreter):
    """Runs a program, labelling what each node returns with its value's kind."""

    def __init__(self, program: Program, kinds: dict[SSAValue, str], storages: Storages):
        super().__init__(program.graph_module)
        self.kinds = kinds
        self.storages = storages

    def run_node(self, node: torch.fx.Node):
        op = node.meta.get(OP_META)
        self.storages.allocating = HOST_TEMPORARY if op is not None and on_host(op) else TEMPORARY
        result = super().run_node(node)
        kind = self.kinds.get(_value(node))
        if kind is not None:
            for storage in _storages(result):
                self.storages.label(storage, kind)
        return result


def _value(node: torch.fx.Node) -> SSAValue | None:
    """The IR value a node computes (a getitem's: that result of its op)."""
    op = node.meta.get(OP_META, node.meta.get(PARAM_META))
    if op is None or not op.results:
        return None
    if node.target is operator.getitem and isinstance(node.args[1], int):
        return op.results[node.args[1]] if node.args[1] < len(op.results) else None
    return op.results[0]


def measure(
    program: Program, inputs, kinds: dict[SSAValue, str], device: torch.device, resident=()
):
    """Run `program` on `inputs` (on `device`), measuring: (its outputs, the
    record). An input whose storage's address is in `resident` is a view of
    state (a weight a pipeline stage's forward kept for its backward): counted
    as parameters."""
    storages = Storages()
    module = program.graph_module
    for node in module.graph.nodes:  # held before the run: state, weights, arena
        if node.op == "get_attr":
            kind = kinds.get(_value(node), TEMPORARY)
            for storage in _storages(getattr(module, node.target)):
                storages.add(storage, kind)
    for storage in _storages(list(inputs)):
        storages.add(storage, PARAMETERS if storage.data_ptr() in resident else INPUTS)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with storages:
            outputs = _Labelled(program, kinds, storages).run(*inputs)
        if cuda:
            torch.cuda.synchronize(device)
            allocator = torch.cuda.max_memory_allocated(device)
    finally:
        storages.close()
    record = {PEAK: storages.peak, **storages.at_peak, UNATTRIBUTED: 0}
    if cuda:  # what kernels allocated for themselves too
        record[PEAK] = max(allocator, storages.peak)
        record[UNATTRIBUTED] = record[PEAK] - storages.peak
    return outputs, record


STATE_HELD = (PARAMETERS, OPTIMIZER_STATE, ACCUMULATORS)  # alive through a whole step


def pipelined_record(actions: list[tuple[dict[str, int], int]], state: dict[str, int]):
    """A pipelined rank's step from its actions' records, each with the bytes
    of the forwards' kept values it did not read (held for later backwards):
    the rank's `state` (its update's record: every stage's parameters,
    optimizer state and accumulators) plus, at the action that needed the
    most, what it allocated and read beyond its state, and the kept values
    it held."""

    def beyond_state(entry) -> int:
        record, held = entry
        return record[PEAK] - sum(record[k] for k in STATE_HELD) + held

    record, held = max(actions, key=beyond_state)
    out = {**record, **{k: state[k] for k in STATE_HELD}}
    out[SAVED] += held
    out[PEAK] = sum(state[k] for k in STATE_HELD) + beyond_state((record, held))
    return out


def storage_bytes(tensors, resident=frozenset()) -> int:
    """Bytes of the distinct storages under `tensors` (a pytree), but those
    at the addresses in `resident` (state and weights, counted already)."""
    found = {s.data_ptr(): s.nbytes() for s in _storages(tensors)}
    return sum(n for address, n in found.items() if address not in resident)


def gather(record: dict[str, int]) -> list[dict[str, int]]:
    """Every rank's record, on every rank (a collective: each rank calls it)."""
    import torch.distributed as dist

    mine = torch.tensor([record[k] for k in FIELDS], dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [dict(zip(FIELDS, (int(x) for x in t.tolist()))) for t in everyone]
