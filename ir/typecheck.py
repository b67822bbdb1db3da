"""Result types: every op must declare the types it computes.

An operator call's result types are inferred by running its target on `meta`
tensors (torch's meta kernels give the shape and dtype of every ATen op, and
of each custom op that registered a fake kernel); collectives have their own
rules over the mesh axis sizes (`plait.mesh`).

Size symbols are checked at two points: each symbol takes a value from its
declared range (`plait.symbols`) at each point, the operands become meta
tensors of their types' sizes there (with the strides the producing op
gives them, so a `view` of a transposed tensor fails as it would at run
time), and the inferred sizes must equal the declared dims evaluated at the
same point. Two points of distinct, non-trivial values (not 0 or 1, unlike
each other and the module's static dims, and multiples of 8 and of the mesh
sizes where the range allows, so sizes a proof showed divisible stay
divisible) tell apart every pair of dims that differ as polynomials of low
degree; a concrete evaluation needs no shape guards, and is exact for ops
that specialize on sizes. Results are cached per (target, arguments,
operand metadata, point), so the repeated blocks of a deep model cost one
inference.

Targets that torch does not know (a custom op whose library was not
imported: verifying never imports code an IR names), and targets whose
result shape depends on tensor data (nonzero, boolean indexing), are not
inferred: their results are taken as declared.
"""

from __future__ import annotations

import functools
import math

import torch
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation, SSAValue

from . import schema, symbolic
from .args import ArgsAttr, Operand, Sym, Tag, operands_in
from .attrs import MESH_ATTR, PLACEMENTS_ATTR, SYMBOLS_ATTR, mesh_axes
from .dtypes import IR_NAMES, TORCH_NAMES, is_floating
from .ops import (
    AllGatherOp,
    AllReduceOp,
    AllToAllOp,
    CallOp,
    CollectiveOp,
    GatherIntoOp,
    LocalShardOp,
    ParamOp,
    ReduceScatterOp,
    WaitOp,
)
from .targets import TARGETS_BY_KIND
from .types import AsyncType, TensorType

# A value at one point: (sizes, strides, element type)
Meta = tuple[tuple[int, ...], tuple[int, ...], str]
Point = tuple[tuple[str, int], ...]  # symbol -> value, sorted by name

_UNBOUNDED_SPAN = 4096  # how far above its minimum an unbounded symbol is sampled
_POINTS = 2


class OpTypeError(Exception):
    """An op whose result types are not what it computes (see `check_types`)."""

    def __init__(self, op: Operation, message: str):
        super().__init__(message)
        self.op, self.message = op, message


# ---- the points ----------------------------------------------------------------


def sample_points(module: ModuleOp) -> tuple[Point, ...]:
    """`_POINTS` assignments of the module's size symbols, from their ranges."""
    symbols = module.attributes.get(SYMBOLS_ATTR)
    if symbols is None:
        return ((),)
    step = math.lcm(8, *mesh_axes(module).values())
    taken = _static_dims(module)
    columns = []
    for name, lo, hi in sorted(symbols.data):
        top = hi if hi is not None else lo + _UNBOUNDED_SPAN
        values = _pick(lo, top, step, taken)
        taken.update(values)
        columns.append((name, values))
    return tuple(tuple((name, values[i]) for name, values in columns) for i in range(_POINTS))


def _pick(lo: int, hi: int, step: int, taken: set[int]) -> list[int]:
    """`_POINTS` values in [lo, hi]: distinct, not taken, multiples of `step`
    where possible; then any values, avoiding 0 and 1."""
    first = max(step, -(-lo // step) * step)
    preferred = range(first, min(hi, first + 64 * step) + 1, step)
    fallback = range(max(lo, 2), min(hi, max(lo, 2) + 256) + 1)
    picked: list[int] = []
    for candidates in (preferred, fallback, range(lo, hi + 1)):
        for v in candidates:
            if len(picked) == _POINTS:
                return picked
            if v not in taken and v not in picked:
                picked.append(v)
    picked += [picked[-1] if picked else lo] * (_POINTS - len(picked))  # a one-value range
    return picked


def _static_dims(module: ModuleOp) -> set[int]:
    dims: set[int] = set()
    for op in module.walk():
        for result in op.results:
            type_ = _tensor_type(result)
            if type_ is not None:
                dims.update(d for d in type_.shape if isinstance(d, int))
    return dims


# ---- declared types at a point --------------------------------------------------


@functools.lru_cache(maxsize=65536)
def _dim_at(dim, point: Point) -> int:
    if isinstance(dim, int):
        return dim
    try:
        return symbolic.evaluate(dim, dict(point))
    except (TypeError, ValueError, ZeroDivisionError, KeyError) as exc:
        where = _point_text(point)
        raise _Mismatch(f"dim {symbolic.to_text(dim)} has no value at {where}: {exc}") from None


@functools.lru_cache(maxsize=65536)
def _sizes_at(type_: TensorType, point: Point) -> tuple[int, ...]:
    sizes = tuple(_dim_at(d, point) for d in type_.shape)
    if any(s < 0 for s in sizes):
        raise _Mismatch(f"{type_} has a negative size at {_point_text(point)}")
    return sizes


def _contiguous(type_: TensorType, point: Point) -> Meta:
    sizes = _sizes_at(type_, point)
    strides, stride = [], 1
    for size in reversed(sizes):
        strides.append(stride)
        stride *= max(size, 1)
    return sizes, tuple(reversed(strides)), type_.dtype


class _Mismatch(Exception):
    """A message about the op being checked."""


def _point_text(point: Point) -> str:
    return ", ".join(f"{name} = {value}" for name, value in point)


# ---- inference ------------------------------------------------------------------


class _Unknown:
    """Marks a call whose results cannot be inferred (taken as declared)."""


UNKNOWN = _Unknown()


def _torch_value(value, inputs: list[torch.Tensor], point: Point):
    if isinstance(value, Operand):
        return inputs[value.index]
    if isinstance(value, tuple):
        return [_torch_value(v, inputs, point) for v in value]
    if isinstance(value, Sym):
        return _dim_at(value.expr, point)
    if isinstance(value, Tag):
        if value.kind == "dtype":
            return _torch_dtype(value.value)
        if value.kind == "device":
            return torch.device("meta")  # never allocate
        if value.kind == "group":
            return value.value  # a kernel's fake implementation does not resolve it
        return getattr(torch, value.value)
    return value


# element-type rules that every backend's kernels enforce but the meta kernels
# do not (mm's meta takes f32 @ i64, bitwise_and's takes floats)
_SAME_DTYPE = TARGETS_BY_KIND["linear"] | TARGETS_BY_KIND["matmul"]
_INTEGRAL = frozenset(
    f"aten::{name}.{overload}"
    for name in ("__and__", "__or__", "__xor__", "bitwise_and", "bitwise_or", "bitwise_xor")
    for overload in ("Tensor", "Scalar")
) | {"aten::bitwise_not"}


def _dtype_rule(target: str, dtypes: list[str]) -> str:
    """What is wrong with the operands' element types for `target`, or ""."""
    if target in _SAME_DTYPE and len(dtypes) > 1:
        return f"{target} needs operands of one element type; they are {', '.join(dtypes)}"
    if target in _INTEGRAL and any(is_floating(d) or d.startswith("c") for d in dtypes):
        return f"{target} takes integer or i1 tensors, not {', '.join(dtypes)}"
    return ""


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, TORCH_NAMES[name])


def _is_meta_limit(exc: Exception) -> bool:
    """Did the meta kernel give up (data-dependent output, no meta kernel)
    rather than reject the arguments?"""
    return isinstance(exc, NotImplementedError) or "meta tensor" in str(exc)


_REGISTERED: set[str] = set()


def _registered(target: str) -> bool:
    """Does torch know the target? Only a yes is kept: a library may register
    a custom op after a verify that did not find it."""
    if target not in _REGISTERED and schema.find_overload(target) is not None:
        _REGISTERED.add(target)
    return target in _REGISTERED


@functools.lru_cache(maxsize=65536)
def _infer_call(
    target: str, args: ArgsAttr, operands: tuple[tuple[Meta, ...], ...], points: tuple[Point, ...]
):
    """Per point, the metas of a call's results (given its operands' metas
    there); UNKNOWN; or (message, point) of the first point where it fails."""
    results = []
    for metas, point in zip(operands, points):
        out = _infer_at(target, args, metas, point)
        if out is UNKNOWN or isinstance(out, str):
            return out if out is UNKNOWN else (out, point)
        results.append(out)
    return tuple(results)


def _infer_at(target: str, args: ArgsAttr, metas: tuple[Meta, ...], point: Point):
    """The metas of a call's results, UNKNOWN, or the error message (a str)."""
    wrong = _dtype_rule(target, sorted({dtype for _, _, dtype in metas}))
    if wrong:
        return wrong
    overload = schema.find_overload(target)
    misplaced = _tensor_where_not_taken(overload, args)
    if misplaced:
        return misplaced
    try:
        inputs = [
            torch.empty_strided(sizes, strides, dtype=_torch_dtype(dtype), device="meta")
            for sizes, strides, dtype in metas
        ]
        call_args = [_torch_value(v, inputs, point) for v in args.args]
        kwargs = {k: _torch_value(v, inputs, point) for k, v in args.kwargs}
        names = schema.argument_names(target) or ()
        if "device" in names and "device" not in kwargs:
            if names.index("device") >= len(call_args):  # a factory: on meta too
                kwargs["device"] = torch.device("meta")
        out = overload(*call_args, **kwargs)
    except _Mismatch as exc:
        return str(exc)
    except Exception as exc:  # a kernel rejects bad arguments with any exception type
        if _is_meta_limit(exc):
            return UNKNOWN
        return f"{target} rejects its arguments: {_first_line(exc)}"
    outs = [] if out is None else list(out) if isinstance(out, (tuple, list)) else [out]
    metas_out = []
    for value in outs:
        if not isinstance(value, torch.Tensor):
            return f"{target} returns a {type(value).__name__}, not a tensor"
        dtype = IR_NAMES.get(str(value.dtype).removeprefix("torch."))
        if dtype is None:
            return f"{target} returns element type {value.dtype}, which plait has no name for"
        metas_out.append((tuple(value.shape), tuple(value.stride()), dtype))
    return tuple(metas_out)


def _tensor_where_not_taken(overload, args: ArgsAttr) -> str:
    """A message if an operand is passed as an argument whose schema type holds
    no tensor (a meta tensor there fails as "data-dependent", not as wrong)."""
    arguments = overload._schema.arguments
    by_name = {a.name: a for a in arguments}
    given = [(arguments[i] if i < len(arguments) else None, v) for i, v in enumerate(args.args)]
    given += [(by_name.get(k), v) for k, v in args.kwargs]
    for argument, value in given:
        if argument is not None and operands_in(value) and "Tensor" not in str(argument.type):
            return (
                f"argument '{argument.name}' of {overload._schema.name} is {argument.type}, "
                "not a tensor"
            )
    return ""


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---- collectives -----------------------------------------------------------------


def _axis_size(op: Operation, mesh: dict[str, int] | None) -> int | None:
    """The size of the op's mesh axis; None in a module without a mesh (its
    collectives cannot run, and only the dims they keep are checked)."""
    axis = op.axis.data
    if mesh is None:
        return None
    if axis not in mesh:
        declared = ", ".join(mesh) or "none"
        raise _Mismatch(
            f"mesh axis '{axis}' is not an axis of the module's {MESH_ATTR} (axes: {declared})"
        )
    return mesh[axis]


def _dim_of(op: Operation, name: str, rank: int) -> int:
    dim = getattr(op, name).value.data
    if not 0 <= dim < rank:
        raise _Mismatch(f"{name} = {dim} is not a dim of a rank-{rank} tensor")
    return dim


def _scaled(sizes: tuple[int, ...], dim: int, by: int, unknown: int) -> tuple[int, ...]:
    """`sizes` with dim `dim` multiplied by `by`, or divided by `-by`; `unknown`
    when `by` is 0 (the axis size is not known)."""
    out = list(sizes)
    if by == 0:
        out[dim] = unknown
    elif by > 0:
        out[dim] *= by
    elif sizes[dim] % -by:
        raise _Mismatch(f"dim {dim} of size {sizes[dim]} does not split over {-by} ranks")
    else:
        out[dim] //= -by
    return tuple(out)


def _collective_sizes(
    op: Operation, sizes: tuple[int, ...], declared: tuple[int, ...], mesh: dict[str, int] | None
) -> tuple[int, ...]:
    n = _axis_size(op, mesh) or 0
    rank = len(sizes)
    if isinstance(op, AllReduceOp):
        return sizes
    if len(declared) != rank:
        raise _Mismatch(f"the result must have the rank of the input ({rank})")
    if isinstance(op, AllGatherOp):
        dim = _dim_of(op, "dim", rank)
        return _scaled(sizes, dim, n, declared[dim])
    if isinstance(op, (ReduceScatterOp, LocalShardOp)):
        dim = _dim_of(op, "dim", rank)
        return _scaled(sizes, dim, -n, declared[dim])
    if isinstance(op, AllToAllOp):
        split, concat = _dim_of(op, "split_dim", rank), _dim_of(op, "concat_dim", rank)
        out = _scaled(sizes, split, -n, declared[split])
        return _scaled(out, concat, n, declared[concat])
    raise _Mismatch(f"{op.name} has no shape rule")


# ---- the check --------------------------------------------------------------------


def _tensor_type(value: SSAValue) -> TensorType | None:
    t = value.type
    t = t.value_type if isinstance(t, AsyncType) else t
    return t if isinstance(t, TensorType) else None


def check_types(module: ModuleOp) -> None:
    """Raise OpTypeError at the first op whose results are not what it computes."""
    points = sample_points(module)
    mesh_attr = module.attributes.get(MESH_ATTR)
    mesh = mesh_attr.axes if mesh_attr is not None else None
    for fn in module.ops:
        if isinstance(fn, func.FuncOp) and len(fn.body.blocks) == 1:
            _Checker(points, mesh).run(fn)


class _Checker:
    def __init__(self, points: tuple[Point, ...], mesh: dict[str, int] | None):
        self.points, self.mesh = points, mesh
        self.values: dict[SSAValue, list[Meta]] = {}  # per point

    def declared(self, value: SSAValue) -> list[Meta]:
        type_ = _tensor_type(value)
        return [_contiguous(type_, p) for p in self.points] if type_ is not None else []

    def metas(self, value: SSAValue) -> list[Meta]:
        if value not in self.values:  # defined outside this block: as declared
            self.values[value] = self.declared(value)
        return self.values[value]

    def run(self, fn: func.FuncOp) -> None:
        block = fn.body.blocks.first
        for op in [fn, *block.ops]:
            try:
                if op is fn:
                    for arg in block.args:
                        self.values[arg] = self.declared(arg)
                elif isinstance(op, CallOp):
                    self.call(op)
                elif isinstance(op, (CollectiveOp, LocalShardOp)):
                    self.collective(op)
                elif isinstance(op, WaitOp):
                    self.values[op.result] = self.metas(op.input)
                elif isinstance(op, ParamOp):
                    self.param(op)
                else:  # returns and other dialects' ops: as declared
                    for result in op.results:
                        self.values[result] = self.declared(result)
            except _Mismatch as exc:
                raise OpTypeError(op, str(exc)) from None

    def call(self, op: CallOp) -> None:
        operands = [self.metas(v) for v in op.inputs]
        per_point = tuple(tuple(m[i] for m in operands) for i in range(len(self.points)))
        inferred = UNKNOWN
        if _registered(op.target_name):
            inferred = _infer_call(op.target_name, op.args, per_point, self.points)
        if inferred is UNKNOWN:
            for result in op.results:
                self.values[result] = self.declared(result)
            return
        if isinstance(inferred[0], str):
            message, point = inferred
            raise _Mismatch(self._at(message, point, op))
        count = len(inferred[0])
        if count != len(op.results):
            raise _Mismatch(
                f"{op.target_name} returns {count} tensor(s) but the op declares "
                f"{len(op.results)} result(s)"
            )
        for r, result in enumerate(op.results):
            computed = [out[r] for out in inferred]
            self._expect(op, result, computed, f"{op.target_name} computes")
            self.values[result] = computed

    def param(self, op: ParamOp) -> None:
        """A sharded weight's type is this rank's slice: its placements must
        name dims it has, and blocks that add up to the whole dim."""
        self.values[op.result] = self.declared(op.result)
        placements = op.attributes.get(PLACEMENTS_ATTR)
        if placements is None or self.mesh is None:
            return
        shape = op.result.type.shape
        for n, placement in zip(self.mesh.values(), placements.data):
            if placement.kind == "flat":  # a piece of the flattened tensor of its shape
                size = -(-math.prod(placement.shape) // n)
                if list(shape) != [size]:
                    raise _Mismatch(
                        f"placement {placement} over {n} ranks holds [{size}] elements a rank, "
                        f"not {list(shape)}"
                    )
                shape = placement.shape  # what the other axes' placements split
        for n, placement in zip(self.mesh.values(), placements.data):
            if placement.kind != "shard":
                continue
            if not 0 <= placement.dim < len(shape):
                raise _Mismatch(
                    f"placement {placement} names dim {placement.dim} of a rank-{len(shape)} weight"
                )
            local, blocks = shape[placement.dim], placement.blocks
            if (
                blocks
                and isinstance(local, int)
                and (sum(blocks) != local * n or any(b % n for b in blocks))
            ):
                raise _Mismatch(
                    f"placement {placement}: the blocks must each split over {n} ranks and add "
                    f"up to the whole dim, {n} x {local}"
                )

    def collective(self, op: Operation) -> None:
        if isinstance(op, GatherIntoOp):
            self.gather_into(op)
            return
        computed = []
        declared = _tensor_type(op.results[0])
        for i, point in enumerate(self.points):
            sizes, strides, dtype = self.metas(op.input)[i]
            out = _collective_sizes(op, sizes, _sizes_at(declared, point), self.mesh)
            if isinstance(op, LocalShardOp):  # a narrow: a view with the input's strides
                computed.append((out, strides, dtype))
            else:  # collectives write fresh, contiguous tensors
                computed.append(_contiguous(TensorType(out, dtype), ()))
        what = f"{op.name} over '{op.axis.data}' ({self._axis_text(op)}) gives"
        self._expect(op, op.results[0], computed, what)
        self.values[op.results[0]] = computed

    def gather_into(self, op: GatherIntoOp) -> None:
        """The result is the destination, written; the pieces must cover it."""
        n = _axis_size(op, self.mesh)
        dest = self.metas(op.dest)
        for (piece, _, _), (sizes, _, _) in zip(self.metas(op.input), dest):
            if n and n * piece[0] < math.prod(sizes):
                raise _Mismatch(
                    f"{n} pieces of {piece[0]} cannot fill a destination of {math.prod(sizes)} "
                    "elements; make each piece ceil(elements / ranks) long"
                )
        self._expect(op, op.results[0], dest, f"{op.name} into {op.dest.type}")
        self.values[op.results[0]] = dest

    def _axis_text(self, op: Operation) -> str:
        return f"{self.mesh[op.axis.data]} ranks" if self.mesh is not None else "no plait.mesh"

    def _expect(self, op: Operation, result: SSAValue, computed: list[Meta], what: str) -> None:
        declared = _tensor_type(result)
        for i, point in enumerate(self.points):
            sizes, _, dtype = computed[i]
            if sizes != _sizes_at(declared, point) or dtype != declared.dtype:
                index = f" #{result.index}" if len(op.results) > 1 else ""
                raise _Mismatch(
                    f"result{index} is declared {declared}, but {what} "
                    f"{self._type_text(op, declared, computed)}; declare that type"
                )

    def _type_text(self, op: Operation, declared: TensorType, computed: list[Meta]) -> str:
        """The computed type, its dims written as declared or operand dims that
        take the same values at every point, else as numbers at the first."""
        candidates = list(declared.shape)
        for value in op.operands:
            type_ = _tensor_type(value)
            candidates += list(type_.shape) if type_ is not None else []
        dims, numbers = [], False
        for d in range(len(computed[0][0])):
            values = [sizes[d] for sizes, _, _ in computed]
            match = next(
                (
                    c
                    for c in candidates
                    if all(_dim_at(c, p) == v for p, v in zip(self.points, values))
                ),
                None,
            )
            numbers |= match is None and len(set(values)) > 1
            dims.append(values[0] if match is None else match)
        text = str(TensorType(dims, computed[0][2]))
        return f"{text} at {_point_text(self.points[0])}" if numbers else text

    def _at(self, message: str, point: Point, op: Operation) -> str:
        types = ", ".join(str(_tensor_type(v)) for v in op.inputs)
        where = f" at {_point_text(point)}" if point else ""
        return f"{message} (operands: {types}{where})"
