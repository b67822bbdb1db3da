"""The torch backend: plait IR -> a per-rank torch.fx GraphModule.

The program calls ATen operators directly (no DTensor, no nn.Module
dispatch), binds its weights from a WeightStore by reference, computes
symbolic sizes from its inputs' shapes, and lowers collectives to PyTorch's
functional collectives. `program.code` is the Python a user can read:

    def forward(self, input_ids, attention_mask):
        seq = torch.ops.aten.sym_size.int(input_ids, 1)
        ...
        linear = torch.ops.aten.linear.default(mul_3, model_layers_0_self_attn_q_proj_weight)
"""

from __future__ import annotations

import builtins
import functools
import inspect
import keyword
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import sympy
import torch
import torch.fx
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation, SSAValue

from .. import customops
from ..customops.adam import adam_update_
from ..ir import args as irargs
from ..ir import symbolic
from ..ir.attrs import (
    ARENA_ATTR,
    FUSE_ATTR,
    FUSE_SCOPE_ATTR,
    PIPELINE_AXIS,
    PLACEMENTS_ATTR,
    STAGE_ATTR,
    SYMBOLS_ATTR,
    mesh_axes,
)
from ..ir.dtypes import TORCH_NAMES
from ..ir.errors import PlaitError
from ..ir.memory import HOST_DEVICE, host_tier, on_host, planned_offset
from ..ir.ops import (
    TAGS_PER_MICRO_BATCH,
    AllGatherOp,
    AllReduceOp,
    AllToAllOp,
    AttentionOp,
    CallOp,
    CollectiveOp,
    ElementwiseOp,
    EmbeddingOp,
    GatherIntoOp,
    LinearOp,
    LocalShardOp,
    MatmulOp,
    NormOp,
    ParamOp,
    RecvOp,
    ReduceOp,
    ReduceScatterOp,
    SendOp,
    SoftmaxOp,
    WaitOp,
)
from ..ir.residual import block_cuts
from ..ir.schema import out_variant
from ..ir.text import where
from ..ir.types import TensorType
from ..ir.weights import WeightStore
from . import bindings
from .adam_chains import AdamChain, adam_chains
from .collective_wait import wait_released
from .host_tasks import HostTasks
from .regions import compile_blocks


class LoweringError(PlaitError):
    """An op the torch backend cannot lower."""


def resolve_target(target: str, op: Operation | None = None) -> torch._ops.OpOverload:
    """Schema name -> the torch OpOverload, or a LoweringError that says what to do."""
    overload = bindings.resolve(target)
    if overload is None:
        location = f"{where(op)}: " if op is not None else ""
        raise LoweringError(
            f"{location}operator '{target}' is not registered with torch; import the library "
            f"that defines it (torch.library) before compiling or running, or replace the op"
        )
    return overload


@functools.lru_cache(maxsize=None)
def _signature(target: torch._ops.OpOverload) -> inspect.Signature:
    return torch.fx.operator_schemas._torchscript_schema_to_signature(target._schema)


def _check_call(op: CallOp, target, args: tuple, kwargs: dict) -> bool:
    """Raise unless the call fits the schema; True if it returns one tensor."""
    try:
        _signature(target).bind(*args, **kwargs)
    except TypeError as exc:
        raise LoweringError(
            f"{where(op)}: the arguments of {op.target_name} do not fit its schema "
            f"({target._schema}): {exc}"
        ) from None
    returns = target._schema.returns
    single = len(returns) == 1 and not str(returns[0].type).startswith(("List", "Optional"))
    variadic = len(returns) == 1 and not single  # Tensor[]: any count
    if not variadic and len(op.results) != (1 if single else len(returns)):
        raise LoweringError(
            f"{where(op)}: {op.target_name} returns {len(returns)} value(s) but the op has "
            f"{len(op.results)} result(s)"
        )
    return single and len(op.results) == 1


def _check_weight(op: ParamOp, tensor: torch.Tensor) -> None:
    """The weight a param binds must have the IR's shape and dtype."""
    expected = op.result.type
    shape_ok = len(tensor.shape) == expected.rank and all(
        not isinstance(d, int) or d == n for d, n in zip(expected.shape, tensor.shape)
    )
    if not shape_ok or str(tensor.dtype).removeprefix("torch.") != TORCH_NAMES[expected.dtype]:
        raise LoweringError(
            f"{where(op)}: weight '{op.weight_name}' is {tuple(tensor.shape)} "
            f"{str(tensor.dtype).removeprefix('torch.')} but the program expects {expected}; "
            "the weights do not belong to this program (check the checkpoint)"
        )


# op families whose results are new tensors, never views of an input (casts can be)
_FRESH = (LinearOp, MatmulOp, AttentionOp, NormOp, SoftmaxOp, ReduceOp, EmbeddingOp, ElementwiseOp)
_MAY_ALIAS = ("aten::to", "aten::type_as")
# reshape-family calls that always return a new tensor (a gradient bucket's cat)
_FRESH_COPIES = ("aten::cat", "aten::stack", "aten::clone")


def _dies_here(op: CollectiveOp) -> bool:
    """May the collective write into its input: nothing else reads it, and it is
    a fresh tensor (no view, weight, program input or arena slot)."""
    producer = op.input.owner
    fresh = isinstance(producer, _FRESH) or (
        isinstance(producer, CallOp) and producer.target_name in _FRESH_COPIES
    )
    if sum(1 for _ in op.input.uses) != 1 or not fresh:
        return False
    if producer.target_name.startswith(_MAY_ALIAS):
        return False
    return planned_offset(producer) is None


def _grouped_kv(block) -> tuple[dict[Operation, list[tuple]], set[Operation]]:
    """Keys and values that transformers' repeat_kv copies for grouped-query
    attention (unsqueeze(x, 2), expand to [b, kv, rep, s, d], reshape to
    [b, kv * rep, s, d]) and only attention reads: SDPA takes them unrepeated
    with enable_gqa, so the copies (a whole KV cache per decode step) are not
    made. Returns attention op -> [(repeated, source)], and the ops skipped."""
    grouped, skipped = {}, set()
    for op in block.ops:
        if not isinstance(op, AttentionOp) or op.arg("enable_gqa", False):
            continue
        chains = [_repeat_chain(op.input_of(op.arg(name)), op) for name in ("key", "value")]
        if all(chains):
            grouped[op] = [(chain[-1].results[0], chain[0].inputs[0]) for chain in chains]
            skipped.update(o for chain in chains for o in chain)
    return grouped, skipped


def _repeat_chain(value: SSAValue | None, reader: Operation) -> list[Operation] | None:
    """[unsqueeze, expand, reshape] making `value`, each read only by the next."""
    chain = []
    for target in ("reshape", "expand", "unsqueeze"):
        op = value.owner if value is not None else None
        if not isinstance(op, CallOp) or op.target_name != f"aten::{target}":
            return None
        if any(use.operation is not reader for use in value.uses):
            return None
        chain.insert(0, op)
        value, reader = op.inputs[0], op
    source, expanded = value.type.shape, chain[1].results[0].type.shape
    repeated = chain[2].results[0].type.shape
    b, kv, s, d = source if len(source) == 4 else (None,) * 4
    if chain[0].arg("dim") != 2 or expanded[:2] != (b, kv) or expanded[3:] != (s, d):
        return None  # not [b, kv, rep, s, d] from the kv heads
    rep = expanded[2]
    return chain if rep != 1 and repeated == (b, kv * rep, s, d) else None


def _attr_key(name: str, shard: tuple | None) -> str:
    """A weight's or state's name in the program, marked by the dim it is sliced on."""
    return name if shard is None else f"{name}_shard{shard[0]}"


_BUILTINS = set(dir(builtins)) | set(keyword.kwlist)


def input_names(block) -> list[str]:
    """A program's argument names: its inputs' name hints, made unique (two
    inputs may share one: xDSL drops a hint's `_1`)."""
    names: list[str] = []
    for index, arg in enumerate(block.args):
        name = arg.name_hint or f"input_{index}"
        while name in names:
            name = f"{name}_{index}"
        names.append(name)
    return names


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, TORCH_NAMES[name])


# fx node meta key: the IR op a node lowers (for per-op profiles)
OP_META = "plait_op"
# and on a get_attr node: the IR param op whose tensor it reads (for memory by kind)
PARAM_META = "plait_param"

# Makes the module through which a program streams its host-tier weights, from
# each streamed weight's loader and name in the order of first use; the program
# calls it ("start", j) to begin reading weight j and ("take", j) for the tensor
# (runtime/prefetch.py's Prefetcher, given by the caller of build_program).
Prefetching = Callable[[list[Callable[[], torch.Tensor]], list[str]], torch.nn.Module]


@dataclass
class Program:
    """One rank's executable program."""

    graph_module: torch.fx.GraphModule
    input_types: list[TensorType]
    input_names: list[str]
    symbols: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    compiled: Callable | None = None  # the graph module through Inductor (`fuse`)

    @property
    def code(self) -> str:
        return self.graph_module.code

    def __call__(self, *inputs: torch.Tensor):
        run = self.graph_module if self.compiled is None else self.compiled
        return run(*inputs)


class _SymExprs:
    """Builds fx nodes that compute symbolic sizes from the inputs' shapes."""

    _OPS = {sympy.Add: operator.add, sympy.Mul: operator.mul}

    def __init__(self, graph: torch.fx.Graph):
        self.graph = graph
        self.nodes: dict[sympy.Expr, torch.fx.Node] = {}

    def bind(self, symbol: str, tensor: torch.fx.Node, dim: int, scale: int = 1, offset: int = 0):
        """The symbol's value from an input dim that is `scale * symbol + offset`."""
        node = self.graph.call_function(torch.ops.aten.sym_size.int, (tensor, dim))
        if offset:
            node = self.graph.call_function(operator.sub, (node, offset))
        if scale != 1:
            node = self.graph.call_function(operator.floordiv, (node, scale))
        node.name = symbol
        self.nodes[symbolic.symbol(symbol)] = node

    def node(self, expr: sympy.Expr):
        if expr.is_Integer:
            return int(expr)
        if expr in self.nodes:
            return self.nodes[expr]
        if expr.is_Symbol:
            raise LoweringError(
                f"size symbol '{expr}' is not a dim of any input; the program cannot compute it"
            )
        args = [self.node(a) for a in expr.args]
        if type(expr) in self._OPS:
            fn = self._OPS[type(expr)]
            out = args[0]
            for a in args[1:]:
                out = self.graph.call_function(fn, (out, a))
        elif expr.is_Pow:
            out = self.graph.call_function(operator.pow, (args[0], args[1]))
        elif isinstance(expr, (sympy.floor, sympy.ceiling)):
            num, den = sympy.fraction(sympy.together(expr.args[0]))
            n, d = self.node(num), self.node(den)
            if isinstance(expr, sympy.floor):
                out = self.graph.call_function(operator.floordiv, (n, d))
            else:  # ceil(n / d) == -((-n) // d)
                neg = self.graph.call_function(operator.neg, (n,))
                out = self.graph.call_function(
                    operator.neg, (self.graph.call_function(operator.floordiv, (neg, d)),)
                )
        elif isinstance(expr, sympy.Mod):
            out = self.graph.call_function(operator.mod, tuple(args))
        elif isinstance(expr, (sympy.Max, sympy.Min)):
            fn = max if isinstance(expr, sympy.Max) else min
            out = self.graph.call_function(fn, tuple(args))
        else:
            raise LoweringError(f"cannot compute size expression {expr}")
        self.nodes[expr] = out
        return out


@dataclass
class CollectiveGroups:
    """This rank's place on the mesh: per axis, the process group's name, the
    axis size and this rank's coordinate along it."""

    names: dict[str, str]
    sizes: dict[str, int]
    coords: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def placeholder(mesh: dict[str, int], rank: int = 0) -> CollectiveGroups:
        """Groups named after their axes, for program source that is read, not run."""
        return CollectiveGroups({a: a for a in mesh}, dict(mesh), mesh_coords(mesh, rank))


class StateLayout(NamedTuple):
    """Where a rank's tensor of one program state sits in the whole tensor:
    `shard` (dim, index, parts, blocks) then the `flat` (index, parts) piece
    of that slice, each None when not split; `owner`: this rank is the lowest
    that holds this piece (it writes it to a checkpoint)."""

    key: str  # the tensor's key in the shared state
    shard: tuple | None
    flat: tuple[int, int] | None
    owner: bool


def mesh_coords(mesh: dict[str, int], rank: int) -> dict[str, int]:
    """A rank's coordinate on each axis; ranks are laid out row-major, last axis fastest."""
    coords = {}
    for axis, size in reversed(list(mesh.items())):
        coords[axis] = rank % size
        rank //= size
    return dict(reversed(list(coords.items())))


SENDS = ("sends",)  # the shared dict's list of point-to-point sends not yet waited on
MICRO_BATCH = ("micro_batch",)  # the shared dict's [index of the micro-batch running]
POSTED = ("posted_recvs",)  # the shared dict's {(rank, wire tag): (tensor, work)} (`post_recv`)


def rank_at(groups: CollectiveGroups, axis: str, coord: int) -> int:
    """The global rank at `coord` on `axis`, at this rank's coordinates on the others."""
    rank = 0
    for name, size in groups.sizes.items():
        rank = rank * size + (coord if name == axis else groups.coords[name])
    return rank


def _isend(sends: list, tensor: torch.Tensor, rank: int, tag: int, micro: list) -> None:
    import torch.distributed as dist

    tag += micro[0] * TAGS_PER_MICRO_BATCH
    sends.append(dist.isend(tensor.contiguous(), rank, tag=tag))


def _recv(shape, dtype, device, rank: int, tag: int, micro: list, posted: dict):
    """The message: received by the irecv posted ahead (`post_recv`), else now."""
    import torch.distributed as dist

    tag += micro[0] * TAGS_PER_MICRO_BATCH
    if (rank, tag) in posted:
        tensor, work = posted.pop((rank, tag))
        work.wait()
        return tensor
    tensor = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(tensor, rank, tag=tag)
    return tensor


def post_recv(shared: dict, op: RecvOp, groups: CollectiveGroups, micro: int, device) -> None:
    """Start receiving `op`'s message of micro-batch `micro` now (an irecv),
    for the program's recv to wait on: a runtime posts the next action's
    receives before running this one, so the transfer overlaps its compute."""
    import torch.distributed as dist

    rank = rank_at(groups, op.axis.data, op.peer.value.data)
    tag = op.tag.value.data + micro * TAGS_PER_MICRO_BATCH
    posted = shared.setdefault(POSTED, {})
    if (rank, tag) not in posted:
        t = op.result.type
        tensor = torch.empty(tuple(t.shape), dtype=torch_dtype(t.dtype), device=device)
        posted[rank, tag] = (tensor, dist.irecv(tensor, rank, tag=tag))


class _Lowering:
    def __init__(
        self,
        weights: WeightStore,
        device: torch.device,
        groups: CollectiveGroups | None,
        fast: bool,
        mesh: dict[str, int],
        arena_size: int = 0,
        shared: dict | None = None,
        prefetching: Prefetching | None = None,
        functional: bool = False,
    ):
        self.weights = weights
        # only out-of-place collectives (Inductor functionalizes the program)
        self.functional = functional
        self.prefetching = prefetching
        # what the programs of one module share: state, weights, layouts, arena
        self.shared = {} if shared is None else shared
        self.fast = fast
        self.mesh = mesh
        self.device = device
        self.groups = groups
        self.graph = torch.fx.Graph()
        self.values: dict[SSAValue, torch.fx.Node] = {}
        self.attrs: dict[str, torch.Tensor] = {}
        self.syms = _SymExprs(self.graph)
        # async collective value -> what its wait must apply after waiting
        self.finishers: dict[SSAValue, object] = {}
        # on gloo, each collective gets a handle of its own to its input (unless
        # it copies it), and its wait also waits until gloo lets go of that and
        # of the result (`collective_wait`)
        self.releases = fast and not functional and device.type == "cpu"
        self.handed: dict[torch.fx.Node, torch.fx.Node] = {}  # pending -> what gloo holds
        self.arena_size = arena_size
        self.arena_views: dict[str, torch.dtype] = {}  # attr name -> dtype viewing the arena
        self.arena_nodes: dict[str, torch.fx.Node] = {}
        self.streamed: list[tuple[ParamOp, tuple | None]] = []
        self.host_tasks: HostTasks | None = None  # offload's host ops, on a thread
        self.futures: dict[SSAValue, torch.fx.Node] = {}  # host value -> its Future
        self.grouped: dict[Operation, list[tuple]] = {}  # attention reading unrepeated k, v

    @functools.cached_property
    def on_meta(self) -> bool:
        """Built on meta weights (program source to read, not run): the arena
        and the state are allocated on meta too."""
        return any(self.weights.is_meta(n) for n in self.weights.names())

    def arg(self, value, op: CallOp):
        if isinstance(value, irargs.Operand):
            return self.values[op.inputs[value.index]]
        if isinstance(value, tuple):
            return [self.arg(v, op) for v in value]
        if isinstance(value, irargs.Sym):
            return self.syms.node(value.expr)
        if isinstance(value, irargs.Tag):
            if value.kind == "dtype":
                return torch_dtype(value.value)
            if value.kind == "device":  # offload's copies to the host, else the program's
                return torch.device("cpu") if value.value == HOST_DEVICE else self.device
            if value.kind == "group":
                if self.groups is None or value.value not in self.groups.names:
                    raise LoweringError(
                        f"{where(op)}: {op.target_name} communicates over mesh axis "
                        f"'{value.value}'; run the program on its mesh (plait run --nproc N)"
                    )
                return self.groups.names[value.value]
            return getattr(torch, value.value)
        return value

    def lower_call(self, op: CallOp) -> None:
        target = resolve_target(op.target_name, op)
        args = tuple(self.arg(a, op) for a in op.args.args)
        kwargs = {k: self.arg(v, op) for k, v in op.args.kwargs}
        kwargs.update(self.prepared(op, args))
        if op in self.grouped:  # reads keys and values unrepeated (see _grouped_kv)
            kwargs["enable_gqa"] = True
        kind, callee = "call_function", target
        offset = planned_offset(op)
        if offset is not None:  # write the result into its place in the arena
            target = callee = resolve_target(out_variant(op.target_name), op)
            kwargs["out"] = self.arena_view(op.results[0].type, offset, op)
        elif self.fast:
            kind, callee = bindings.fast_call(target, op.target_name)
        single = _check_call(op, target, args, kwargs)
        node = self._node(callee, args, kwargs, op, kind=kind)
        if single:
            self.values[op.results[0]] = node
            return
        for i, result in enumerate(op.results):
            self.values[result] = self._node(operator.getitem, (node, i), {}, op, result)

    def fused_updates(self, block, takes) -> dict[Operation, AdamChain]:
        """The Adam updates run as one call each (customops/adam.py): not when
        re-exporting (plain ATen) or under Inductor (it fuses them itself)."""
        if not self.fast or self.functional:
            return {}
        return {
            op: chain
            for op, chain in adam_chains(block).items()
            if not any(isinstance(v, SSAValue) and v in takes for v in chain.call_args())
            and not any(planned_offset(m) is not None for m in (op, *chain.members))
            and len({on_host(m) for m in (op, *chain.members)}) == 1  # (offload's: all host)
        }

    def lower_adam_update(self, op: CallOp, chain: AdamChain) -> None:
        """One call for the chain: on the host's thread where offload put it
        (DeepSpeed's CPU Adam is such a kernel), else in line."""
        host = on_host(op)
        if not host:
            self.await_host_values([a for a in chain.call_args() if isinstance(a, SSAValue)])
        args = tuple(self.values[a] if isinstance(a, SSAValue) else a for a in chain.call_args())
        if host:
            self._submit(op, "plait::adam_update_", adam_update_, args, {})
        else:
            self.values[op.results[0]] = self._node(adam_update_, args, {}, op)

    def lower_host_call(self, op: CallOp) -> bool:
        """Submit a host op to the background thread (see host_tasks); False
        where it runs in line (several results; a program Inductor compiles)."""
        if self.functional or len(op.results) != 1:
            return False
        target = resolve_target(op.target_name, op)
        args = tuple(self.arg(a, op) for a in op.args.args)
        kwargs = {k: self.arg(v, op) for k, v in op.args.kwargs}
        if not _check_call(op, target, args, kwargs):
            return False
        self._submit(op, op.target_name, target, args, kwargs)
        return True

    def _submit(self, op: CallOp, name: str, callee, args: tuple, kwargs: dict) -> None:
        if self.host_tasks is None:
            self.host_tasks = self.attrs["host"] = HostTasks()
        task = ("submit", self.host_tasks.add(name, callee), args, kwargs)
        node = self._node("host", task, {}, op, kind="call_module")
        self.values[op.results[0]] = self.futures[op.results[0]] = node

    def await_host_values(self, values) -> None:
        """A device op reading host values waits for them (once each)."""
        for value in values:
            if value in self.futures:
                node = self.graph.call_module("host", ("result", self.futures.pop(value)))
                node.name = value.name_hint or node.name
                self.values[value] = node

    def stream(self, ops: list[Operation]):
        """The streamed weights' schedule: value -> its index (taken at first
        use), and op index -> copies to start after it (two ahead)."""
        if not self.streamed:
            return {}, {}
        position = {op: i for i, op in enumerate(ops)}

        def uses(param):
            return [position[u.operation] for u in param.result.uses]

        order = sorted(self.streamed, key=lambda s: min(uses(s[0])))
        if self.prefetching is None:
            raise LoweringError(
                f"{where(order[0][0])}: the program streams weights from the host tier; give "
                "build_program a prefetching (plait.runtime.prefetch.Prefetcher)"
            )
        loaders = [functools.partial(self._load, p, shard) for p, shard in order]
        self.attrs["prefetch"] = self.prefetching(loaders, [p.weight_name for p, _ in order])
        starts: dict[int, list[int]] = {-1: [0, 1][: len(order)]}
        for j in range(2, len(order)):
            starts.setdefault(max(uses(order[j - 2][0])), []).append(j)
        for j in starts.pop(-1):
            self.graph.call_module("prefetch", ("start", j))
        return {p.result: j for j, (p, _) in enumerate(order)}, starts

    def _load(self, op: ParamOp, shard) -> torch.Tensor:
        tensor = self.weights.read(op.weight_name, shard)
        _check_weight(op, tensor)
        return tensor if tensor.is_meta else tensor.to(self.device)

    def arena_view(self, type_: TensorType, offset: int, op: CallOp) -> torch.fx.Node:
        """A contiguous tensor of `type_` at byte `offset` of the arena."""
        dtype = torch_dtype(type_.dtype)
        key = f"arena_{type_.dtype}"
        if key not in self.arena_views:
            self.arena_views[key] = dtype
            self.arena_nodes[key] = self.graph.get_attr(key)
        shape = [self.syms.node(sympy.sympify(d)) for d in type_.shape]
        strides, stride = [], sympy.Integer(1)
        for d in reversed(type_.shape):
            strides.append(self.syms.node(stride))
            stride = stride * sympy.sympify(d)
        args = (self.arena_nodes[key], shape, strides[::-1], offset // dtype.itemsize)
        node = self.graph.call_function(torch.ops.aten.as_strided.default, args)
        node.name = f"{op.results[0].name_hint or 'result'}_out"
        return node

    def prepared(self, op: CallOp, args: tuple) -> dict[str, torch.fx.Node]:
        """Weights in a kernel's own layout, computed now (see `customops.preparer`)."""
        prepare = customops.preparer(op.target_name)
        if prepare is None:
            return {}
        weights = [a.target for a in args if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
        known = [
            self.attrs[a.target] if isinstance(a, torch.fx.Node) and a.target in weights else a
            for a in args
        ]
        known = [None if isinstance(a, torch.fx.Node) else a for a in known]
        if not weights:  # every weight streamed (tier): nothing known now
            return {}
        if ("prepared", weights[0]) not in self.shared:
            try:
                self.shared["prepared", weights[0]] = prepare(known)
            except customops.KernelArgumentError as exc:
                raise LoweringError(f"{where(op)}: {exc}") from None
        nodes = {}
        for name, tensor in self.shared["prepared", weights[0]].items():
            nodes[name] = self.bind(f"{weights[0]}_{name}", tensor)  # after its first weight
        return nodes

    def _slice(self, op: ParamOp) -> tuple | None:
        """(dim, index, parts, blocks) of this rank's slice of a sharded weight, or None."""
        placements = op.attributes.get(PLACEMENTS_ATTR)
        for axis, placement in zip(self.mesh, placements.data if placements else ()):
            if placement.kind == "shard":
                if self.groups is None:
                    raise LoweringError(
                        f"{where(op)}: a sharded weight needs the rank's mesh position"
                    )
                coords, sizes = self.groups.coords[axis], self.groups.sizes[axis]
                return placement.dim, coords, sizes, placement.blocks
        return None

    def _flat_piece(self, op: ParamOp) -> tuple[int, int] | None:
        """(index, parts) of this rank's piece of a state flattened over an axis, or None."""
        placements = op.attributes.get(PLACEMENTS_ATTR)
        for axis, placement in zip(self.mesh, placements.data if placements else ()):
            if placement.kind == "flat" and self.groups is not None:
                return self.groups.coords[axis], self.groups.sizes[axis]
        return None

    def _owns(self, op: ParamOp) -> bool:
        """This rank is at coordinate 0 on every axis that does not split the state."""
        placements = op.attributes.get(PLACEMENTS_ATTR)
        split = {
            axis
            for axis, placement in zip(self.mesh, placements.data if placements else ())
            if placement.kind in ("shard", "flat")
        }
        if STAGE_ATTR in op.attributes:  # held by one pipeline stage only
            split.add(PIPELINE_AXIS)
        coords = self.groups.coords if self.groups is not None else {}
        return all(c == 0 for axis, c in coords.items() if axis not in split)

    def lower_param(self, op: ParamOp) -> None:
        name = op.weight_name
        shard = self._slice(op)
        if op.is_state:
            self.lower_state(op, shard)
            return
        if host_tier(op):  # streamed: fetched ahead of its first use (see `stream`)
            self.streamed.append((op, shard))
            return
        key = _attr_key(name, shard)
        if ("weight", key) not in self.shared:
            tensor = self.weights.get(name)
            if shard is not None:  # this rank's slice of the weight
                tensor = self.weights.get_shard(name, *shard)
            _check_weight(op, tensor)
            if tensor.device != self.device and not tensor.is_meta:
                tensor = tensor.to(self.device)
            self.shared["weight", key] = tensor
        self.values[op.result] = self.bind(key, self.shared["weight", key])

    def bind(self, key: str, tensor: torch.Tensor) -> torch.fx.Node:
        """A program attribute read by a get_attr node. Names are flat
        ("model_layers_0_mlp_up_proj_weight"): a nested path costs one
        Module.__getattr__ per level on every call."""
        flat = key.replace(".", "_")
        while flat in self.attrs and self.attrs[flat] is not tensor:
            flat += "_"
        self.attrs[flat] = tensor
        return self.graph.get_attr(flat)

    def lower_state(self, op: ParamOp, shard) -> None:
        """Program state: allocated on first use, this rank's part only, from
        its initial value in the weights (training state), else zero-filled."""
        type_ = op.result.type
        if not all(isinstance(d, int) for d in type_.shape):
            raise LoweringError(f"{where(op)}: state '{op.weight_name}' needs a static shape")
        key = _attr_key(op.weight_name, shard)
        tensor = self.shared.get(("state", key))
        if tensor is None:
            device = torch.device("meta") if self.on_meta else self.device
            if on_host(op) and not self.on_meta:  # offload: kept in host memory
                device = torch.device("cpu")
            with torch.inference_mode(False):  # updated in place in and out of inference mode
                if op.weight_name in self.weights:  # a copy: the program updates it in place
                    # ZeRO's flat piece of it, too
                    initial = self.weights.get_piece(op.weight_name, shard, self._flat_piece(op))
                    _check_weight(op, initial)
                    tensor = initial.to(device, copy=True)
                else:
                    tensor = torch.zeros(type_.shape, dtype=torch_dtype(type_.dtype), device=device)
                if device.type == "cpu" and self.device.type == "cuda":  # copied at full speed
                    tensor = tensor.pin_memory()
            self.shared["state", key] = tensor
            layout = StateLayout(key, shard, self._flat_piece(op), self._owns(op))
            self.shared["layout", op.weight_name] = layout
        elif tuple(tensor.shape) != tuple(type_.shape):
            raise LoweringError(
                f"{where(op)}: state '{op.weight_name}' is {list(type_.shape)} here but "
                f"{list(tensor.shape)} in another function of the module; shard them alike"
            )
        self.values[op.result] = self.bind(key, tensor)

    def lower_local_shard(self, op: LocalShardOp) -> None:
        axis, dim = op.axis.data, op.dim.value.data
        if self.groups is None or axis not in self.groups.coords:
            raise LoweringError(f"{where(op)}: plait.local_shard needs the rank's mesh position")
        size = self.syms.node(sympy.sympify(op.result.type.shape[dim]))  # int, or a size node
        coord = self.groups.coords[axis]
        start = (
            coord * size
            if isinstance(size, int)
            else self.graph.call_function(operator.mul, (size, coord))
        )
        args = (self.values[op.input], dim, start, size)
        self.values[op.result] = self._node(torch.ops.aten.narrow.default, args, {}, op)

    def lower_point_to_point(self, op: SendOp | RecvOp) -> None:
        """torch.distributed's isend (its work kept in the shared `SENDS`, for
        the runtime to wait on at the step's end) or a blocking recv; the tag
        is the op's plus the micro-batch's (the runtime sets `MICRO_BATCH`)."""
        axis, peer, tag = op.axis.data, op.peer.value.data, op.tag.value.data
        if self.groups is None or axis not in self.groups.coords:
            raise LoweringError(f"{where(op)}: {op.name} over mesh axis '{axis}' needs its mesh")
        rank = rank_at(self.groups, axis, peer)
        micro = self.bind("micro_batch", self.shared.setdefault(MICRO_BATCH, [0]))
        if isinstance(op, SendOp):
            sends = self.bind("sends", self.shared.setdefault(SENDS, []))
            self._node(_isend, (sends, self.values[op.input], rank, tag, micro), {}, op)
            return
        t = op.result.type
        posted = self.bind("posted_recvs", self.shared.setdefault(POSTED, {}))
        # a size symbol (a prompt's length) the rank computes from its own inputs
        shape = tuple(self.syms.node(sympy.sympify(d)) for d in t.shape)
        args = (shape, torch_dtype(t.dtype), self.device, rank, tag, micro, posted)
        self.values[op.result] = self._node(_recv, args, {}, op)

    def lower_collective(self, op: CollectiveOp) -> None:
        if self.groups is None or op.axis.data not in self.groups.names:
            raise LoweringError(
                f"{where(op)}: {op.name} over mesh axis '{op.axis.data}' needs a process group; "
                "run the program on its mesh (plait run --nproc N)"
            )
        pending, finish = self._start_collective(op, self.values[op.input])
        if op.is_async is None:
            self.values[op.result] = finish(self._wait(pending, op))
        else:  # the matching plait.wait finishes it
            self.values[op.result] = pending
            self.finishers[op.result] = finish

    def lower_wait(self, op: WaitOp) -> None:
        finish = self.finishers.pop(op.input)
        self.values[op.result] = finish(self._wait(self.values[op.input], op))

    def _wait(self, pending: torch.fx.Node, op: Operation) -> torch.fx.Node:
        if self.releases:
            return self._node(wait_released, (pending, self.handed.pop(pending)), {}, op)
        return self._node(torch.ops._c10d_functional.wait_tensor.default, (pending,), {}, op)

    def _start_collective(self, op: CollectiveOp, x: torch.fx.Node):
        """Issue the collective: (its pending result, what turns the waited result into ours)."""
        group = self.groups.names[op.axis.data]
        size = self.groups.sizes[op.axis.data]
        c10d = torch.ops._c10d_functional
        aten = torch.ops.aten
        name = f"{op.results[0].name_hint or 'collective'}_pending"

        def call(target, x, *args, copies_input=False):
            if self.releases and not copies_input:
                x = self.graph.call_function(aten.detach.default, (x,))
            node = self.graph.create_node("call_function", target, (x, *args), {}, name=name)
            node.meta[OP_META] = op
            self.handed[node] = node if copies_input else x
            return node

        if isinstance(op, GatherIntoOp):
            return self._gather_into(op, x, call)
        if isinstance(op, AllReduceOp):
            # into the input itself when nothing else reads it (no copy)
            in_place = _dies_here(op) and not self.functional
            reduce = c10d.all_reduce_ if in_place else c10d.all_reduce
            pending = call(reduce.default, x, op.reduce.data, group, copies_input=not in_place)
            return pending, lambda y: y
        if isinstance(op, (AllGatherOp, ReduceScatterOp)):
            # functional collectives gather and scatter along dim 0; along another
            # dim the n pieces are put in a leading dim and back, one copy each way,
            # unless every dim before it has size 1 (batch 1 split by sequence):
            # then the pieces lie in memory as dim 0's would, and views suffice
            dim = op.dim.value.data
            ndim = len(op.input.type.shape)
            if dim and all(d == 1 for d in op.input.type.shape[:dim]):
                flat = self.graph.call_function(aten.contiguous.default, (x,))
                flat = self.graph.call_function(aten.flatten.using_ints, (flat, 0, dim))
                pending, done = self._along_dim0(op, flat, ndim - dim, call)
                ones = [1] * dim
                return pending, lambda y: self._node(
                    aten.unflatten.int, (done(y), 0, [*ones, -1]), {}, op
                )
            if isinstance(op, AllGatherOp):
                x = self.graph.call_function(aten.contiguous.default, (x,))
                pending, done = self._along_dim0(op, x, ndim, call)
                if dim == 0:
                    return pending, done
                return pending, lambda y: self._pieces_back(done(y), dim, size, op)
            if dim != 0:
                x = self._pieces_first(x, dim, size)
            return self._along_dim0(op, x, ndim, call)
        if isinstance(op, AllToAllOp):  # piece i of split_dim to rank i, received pieces
            split, concat = op.split_dim.value.data, op.concat_dim.value.data  # joined on concat
            x = self._pieces_first(x, split, size)
            piece = self.graph.call_function(aten.sym_size.int, (x, 0))
            piece = self.graph.call_function(operator.floordiv, (piece, size))
            pending = call(c10d.all_to_all_single.default, x, [piece] * size, [piece] * size, group)
            return pending, lambda y: self._pieces_back(y, concat, size, op)
        raise LoweringError(f"{where(op)}: {op.name} has no lowering")

    def _along_dim0(self, op: CollectiveOp, x: torch.fx.Node, ndim: int, call):
        """An all-gather or reduce-scatter along dim 0 of `x` (`ndim` dims):
        (pending, what turns the waited result into the collective's). On gloo
        both copy into a buffer of their own (measured: a reduce-scatter one of
        its input's size, an all-gather one of its output's), so an all-gather
        runs as one in-place broadcast per rank into the output (this rank's
        piece copied in first: 3x faster than gloo's own, measured), and a
        float reduce-scatter as an in-place all-reduce of its input (a copy
        unless it dies here), then this rank's piece copied out."""
        aten, c10d = torch.ops.aten, torch.ops._c10d_functional
        group, size = self.groups.names[op.axis.data], self.groups.sizes[op.axis.data]
        gather = isinstance(op, AllGatherOp)
        coord = self.groups.coords.get(op.axis.data)  # (groups made without coordinates: None)
        float_ = torch_dtype(op.input.type.dtype).is_floating_point
        if not (self.releases and (gather or float_) and coord is not None):
            if gather:
                return call(c10d.all_gather_into_tensor.default, x, size, group), lambda y: y
            scatter = c10d.reduce_scatter_tensor.default
            return call(scatter, x, op.reduce.data, size, group), lambda y: y
        if gather:
            return self._broadcast_pieces(op, x, ndim, coord), lambda y: y
        if not _dies_here(op):
            x = self.graph.call_function(aten.clone.default, (x,))
        pending = call(c10d.all_reduce_.default, x, op.reduce.data, group)

        def piece(y: torch.fx.Node) -> torch.fx.Node:
            pieces = self.graph.call_function(aten.chunk.default, (y, size, 0))
            mine = self.graph.call_function(operator.getitem, (pieces, coord))
            return self._node(aten.clone.default, (mine,), {}, op)

        return pending, piece

    def _gather_into(self, op: GatherIntoOp, piece: torch.fx.Node, call):
        """Rank r's piece into the destination's flat elements [r * p, (r + 1) * p):
        on gloo one in-place broadcast per rank straight into the destination
        (as ZeroRedundancyOptimizer makes parameters whole: no gathered copy);
        elsewhere an all-gather, then a copy into it."""
        aten, c10d = torch.ops.aten, torch.ops._c10d_functional
        group, size = self.groups.names[op.axis.data], self.groups.sizes[op.axis.data]
        coord = self.groups.coords.get(op.axis.data)
        shape = [int(d) for d in op.dest.type.shape]
        numel, p = math.prod(shape), int(op.input.type.shape[0])
        flat = self.graph.call_function(aten.view.default, (self.values[op.dest], [numel]))

        def whole(y: torch.fx.Node) -> torch.fx.Node:
            return self._node(aten.view.default, (y, shape), {}, op)

        if not (self.releases and coord is not None):
            gathered = call(c10d.all_gather_into_tensor.default, piece, size, group)

            def copied(y: torch.fx.Node) -> torch.fx.Node:
                valid = self.graph.call_function(aten.slice.Tensor, (y, 0, 0, numel))
                return whole(self.graph.call_function(aten.copy_.default, (flat, valid)))

            return gathered, copied
        regions = {
            r: self.graph.call_function(
                aten.slice.Tensor, (flat, 0, r * p, min((r + 1) * p, numel))
            )
            for r in range(size)
            if r * p < numel  # (past the end: only padding)
        }
        if coord in regions:  # this rank's piece, less its padding
            piece = self.graph.call_function(aten.slice.Tensor, (piece, 0, 0, numel - coord * p))
        self.handed[flat] = self._broadcast_regions(op, regions, coord, piece)
        return flat, whole

    def _broadcast_pieces(self, op: CollectiveOp, x: torch.fx.Node, ndim: int, coord: int):
        """The all-gather of `x` along dim 0 as in-place broadcasts, rank r's
        piece from rank r into row r of a fresh output: the pending output
        (one wait takes every broadcast: gloo's works are kept by storage)."""
        aten, size = torch.ops.aten, self.groups.sizes[op.axis.data]
        dims = [self.graph.call_function(aten.sym_size.int, (x, d)) for d in range(ndim)]
        length = self.graph.call_function(operator.mul, (dims[0], size))
        out = self.graph.call_function(aten.new_empty.default, (x, [length, *dims[1:]]))
        pieces = self.graph.call_function(aten.unflatten.int, (out, 0, [size, -1]))
        rows = {r: self.graph.call_function(aten.select.int, (pieces, 0, r)) for r in range(size)}
        self.handed[out] = self._broadcast_regions(op, rows, coord, x)
        return out

    def _broadcast_regions(self, op: CollectiveOp, regions: dict, coord: int, mine) -> list:
        """Rank r's region broadcast from rank r, in place, for each r in
        `regions` (this rank's filled from `mine` first): the broadcasts, which
        the wait is handed (every node read: torch.fx's Interpreter keeps an
        unread node's value)."""
        aten, c10d = torch.ops.aten, torch.ops._c10d_functional
        group = self.groups.names[op.axis.data]
        sent = []
        for r, region in regions.items():
            if r == coord:
                region = self.graph.call_function(aten.copy_.default, (region, mine))
            sent.append(self.graph.call_function(c10d.broadcast_.default, (region, r, group)))
        return sent

    def _pieces_first(self, x: torch.fx.Node, dim: int, size: int) -> torch.fx.Node:
        """[..., d_dim, ...] -> [n * d0, ..., d_dim / n, ...]: piece i of `dim` leads."""
        aten = torch.ops.aten
        pieces = self.graph.call_function(aten.unflatten.int, (x, dim, [size, -1]))
        moved = self.graph.call_function(aten.movedim.int, (pieces, dim, 0))
        packed = self.graph.call_function(aten.contiguous.default, (moved,))
        return self.graph.call_function(aten.flatten.using_ints, (packed, 0, 1))

    def _pieces_back(self, y: torch.fx.Node, dim: int, size: int, op: Operation):
        """[n * d0, ...] -> [..., n * d_dim, ...]: the n leading pieces joined along `dim`."""
        aten = torch.ops.aten
        pieces = self.graph.call_function(aten.unflatten.int, (y, 0, [size, -1]))
        moved = self.graph.call_function(aten.movedim.int, (pieces, 0, dim))
        return self._node(aten.flatten.using_ints, (moved, dim, dim + 1), {}, op)

    def _node(
        self,
        target,
        args,
        kwargs,
        op: Operation,
        result: SSAValue | None = None,
        kind="call_function",
    ):
        """A call node named after the IR value it computes, tagged with the op."""
        value = result or (op.results[0] if op.results else None)
        name = value.name_hint if value is not None else None
        node = self.graph.create_node(kind, target, args, kwargs, name=name)
        node.meta[OP_META] = op
        return node

    def run(self, fn: func.FuncOp) -> torch.fx.GraphModule:
        block = fn.body.blocks.first
        types = list(fn.function_type.inputs)
        for arg, name in zip(block.args, input_names(block)):
            # (fx renames a builtin's name, such as `input`, and can clash with the next)
            self.values[arg] = self.graph.placeholder(f"{name}_" if name in _BUILTINS else name)
        # bind each symbol from the first input dim that is exactly that symbol,
        # else from one linear in it (a derived dim such as 2*k)
        for only_exact in (True, False):
            for arg, type_ in zip(block.args, types):
                for d, dim in enumerate(type_.shape):
                    linear = symbolic.linear_in_one_symbol(dim)
                    if not linear or linear[0] in self.syms.nodes:
                        continue
                    symbol, scale, offset = linear
                    if (scale, offset) == (1, 0) or not only_exact:
                        self.syms.bind(symbol.name, self.values[arg], d, scale, offset)
        for type_ in types:
            for dim in type_.shape:
                unbound = symbolic.free_names(dim) - {
                    s.name for s in self.syms.nodes if s.is_Symbol
                }
                if unbound:
                    raise LoweringError(
                        f"input dim {symbolic.to_text(dim)} uses size symbol '{sorted(unbound)[0]}', "
                        "which no input has as a dim of its own; plait reads each symbol's value "
                        "from an input dim that is that symbol or linear in it (2*k + 1)"
                    )
        ops = list(block.ops)
        self.grouped, skipped = _grouped_kv(block)
        for op in ops:
            if isinstance(op, ParamOp):
                self.lower_param(op)
                if op.result in self.values:  # (a streamed weight is bound at first use)
                    self.values[op.result].meta[PARAM_META] = op
        takes, starts = self.stream(ops)
        fused = self.fused_updates(block, takes)
        skipped |= {member for chain in fused.values() for member in chain.members}
        for index, op in enumerate(ops):
            if isinstance(op, ParamOp) or op in skipped:
                continue  # bound above, a copy grouped-query attention does without, or fused
            for repeated, source in self.grouped.get(op, ()):
                self.values[repeated] = self.values[source]
            for value in op.operands:
                if value in takes:  # a streamed weight, first used here
                    node = self.graph.call_module("prefetch", ("take", takes.pop(value)))
                    node.name = value.name_hint or node.name
                    self.values[value] = node
            fused_here = op in fused
            submitted = not fused_here and isinstance(op, CallOp) and on_host(op)
            submitted = submitted and self.lower_host_call(op)  # (runs on the host's thread)
            if not (fused_here or submitted):  # (a host op run in line waits too)
                self.await_host_values(op.operands)
            if fused_here:
                self.lower_adam_update(op, fused[op])
            elif submitted:
                pass
            elif isinstance(op, CallOp):
                self.lower_call(op)
            elif isinstance(op, CollectiveOp):
                self.lower_collective(op)
            elif isinstance(op, WaitOp):
                self.lower_wait(op)
            elif isinstance(op, LocalShardOp):
                self.lower_local_shard(op)
            elif isinstance(op, (SendOp, RecvOp)):
                self.lower_point_to_point(op)
            elif isinstance(op, func.ReturnOp):
                if self.host_tasks is not None:  # the step's update is done when it is
                    self.graph.call_module("host", ("drain",))
                self.graph.output(tuple(self.values[v] for v in op.arguments))
            else:
                raise LoweringError(f"{where(op)}: the torch backend has no lowering for {op.name}")
            for j in starts.get(index, ()):
                self.graph.call_module("prefetch", ("start", j))
        if self.arena_views:  # allocated once; planned results are views of it
            if ("arena",) not in self.shared:  # the module's functions never run at once
                device = "meta" if self.on_meta else self.device
                self.shared["arena",] = torch.empty(
                    self.arena_size, dtype=torch.uint8, device=device
                )
            arena = self.shared["arena",]
            for key, dtype in self.arena_views.items():
                self.attrs[key] = arena.view(dtype)
        gm = torch.fx.GraphModule(self.attrs, self.graph, class_name="PlaitProgram")
        for name in list(gm._buffers):  # plain attributes: read without Module.__getattr__
            gm.__dict__[name] = gm._buffers.pop(name)
        return gm


def run_observed(
    module: ModuleOp,
    weights: WeightStore,
    batches: list[tuple],
    observers: dict[Operation, Callable[[tuple], None]],
) -> None:
    """Build the program of `module` (operators through their OpOverloads) and
    run it on each batch; before an op of `observers` runs, call its observer
    with the op's arguments (torch.fx's Interpreter)."""
    program = build_program(module, weights, fast=False)

    class Observed(torch.fx.Interpreter):
        def run_node(self, node):
            observe = observers.get(node.meta.get(OP_META))
            if observe and node.op == "call_function" and node.target is not operator.getitem:
                observe(self.fetch_args_kwargs_from_env(node)[0])
            return super().run_node(node)

    with torch.inference_mode():
        for batch in batches:
            Observed(program.graph_module).run(*batch)


def build_program(
    module: ModuleOp,
    weights: WeightStore,
    device: str | torch.device = "cpu",
    groups: CollectiveGroups | None = None,
    function: str = "forward",
    fast: bool = True,
    shared: dict | None = None,
    prefetching: Prefetching | None = None,
) -> Program:
    """Lower the function `function` of `module` to a runnable torch program.

    `fast=False` calls every operator through its OpOverload (for re-export).
    Programs of one module built with the same `shared` dict share this rank's
    weights, kernel layouts, arena and state (a KV cache: they update the same
    tensors). A program that streams weights from the host tier (`tier`)
    streams them through the module `prefetching` makes.
    """
    fn = next(
        (op for op in module.ops if isinstance(op, func.FuncOp) and op.sym_name.data == function),
        None,
    )
    if fn is None:
        raise LoweringError(f"the module has no function @{function}")
    mesh = mesh_axes(module)
    arena = module.attributes.get(ARENA_ATTR)
    arena_size = arena.value.data if arena is not None else 0
    fuse = module.attributes.get(FUSE_ATTR) if fast else None  # (re-export: plain ATen)
    lowering = _Lowering(
        weights,
        torch.device(device),
        groups,
        fast,
        mesh,
        arena_size,
        shared,
        prefetching,
        functional=fuse is not None,
    )
    gm = lowering.run(fn)
    symbols = module.attributes.get(SYMBOLS_ATTR)
    compiled = None  # torch.compile compiles on the first call
    if fuse is not None and FUSE_SCOPE_ATTR in module.attributes:
        cuts = [
            lowering.values[v]
            for v in block_cuts(fn.body.blocks.first).values
            if v in lowering.values
        ]
        compiled = compile_blocks(gm, cuts, fuse.data)
    if fuse is not None and compiled is None:
        compiled = torch.compile(gm, mode=fuse.data)
    return Program(
        graph_module=gm,
        input_types=list(fn.function_type.inputs),
        input_names=input_names(fn.body.blocks.first),
        symbols=symbols.ranges if symbols is not None else {},
        compiled=compiled,
    )
