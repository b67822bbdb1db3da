"""zero{stage=1|2|3}: ZeRO over the data axis of a sharded training step.

After `shard{mesh=dp:N[,tp:M]}` the N data-parallel ranks each hold the
whole (tp-local) parameters, gradients and optimizer moments, and all run
the same update. ZeRO (Rajbhandari et al., 2020) splits that over the ranks:

- stage 1, optimizer state: each rank keeps 1/N of every moment and runs the
  optimizer's element-wise update on its 1/N of each parameter; each updated
  slice is gathered straight into its parameter (`plait.all_gather_into`,
  started when the slice is made, waited for at the step's end).
- stage 2, and gradients: each gradient bucket's all-reduce becomes a
  reduce-scatter, so a rank receives only its slice of the summed gradients;
  gradient clipping's global norm sums the squares of the slices, over the
  ranks with one all-reduce. With gradient accumulation the accumulators
  hold pieces too, and @accumulate reduce-scatters each micro-batch's
  gradients into them (DeepSpeed's stage 2 reduces every micro-batch too).
- stage 3, and parameters: each rank holds its piece of every parameter and
  updates it in place; a parameter is all-gathered whole just before its
  first use in forward and again in backward (each copy dies after its
  phase), in async buckets, each started as the one `prefetch` before it
  (one by default) is first used.

A rank's slice of a tensor is of its flattened form, zero-padded to a
multiple of N (a `flat` placement: `plait.placements<[flat([176, 64])]>`,
ceil(numel / N) elements a rank), one per parameter, so a checkpoint still
holds whole tensors by name: the state program gathers them
(`ir.training.state_module`) and a rank reads its piece of a whole tensor
when it starts (`ir.weights.flat_piece`).

    canonicalize,cse,dce,shard{mesh=dp:2,tp:2},zero{stage=2}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, ModuleOp, StringAttr
from xdsl.ir import Block, Operation, SSAValue
from xdsl.rewriter import InsertPoint, Rewriter

from ...ir.args import Operand
from ...ir.attrs import PLACEMENTS_ATTR, REPLICATE, PlacementsAttr, flat, mesh_axes
from ...ir.errors import PlaitError
from ...ir.memory import on_host
from ...ir.ops import (
    AllGatherOp,
    AllReduceOp,
    CallOp,
    CollectiveOp,
    ElementwiseOp,
    GatherIntoOp,
    LocalShardOp,
    ParamOp,
    ReduceScatterOp,
    WaitOp,
)
from ...ir.schema import writes_input
from ...ir.text import where
from ...ir.training import (
    ACCUMULATE,
    ACCUMULATOR,
    GRAD_OF,
    STATE_OF,
    TRAIN_STEP,
    gradients,
    mark_gradient,
)
from ..base import Pass
from ..options import OptionError
from .grad_buckets import BUCKET_MB, bucket_parts
from .rules import DATA_AXES
from .shard import insert_call
from .step import _VIEWS, squares_for_global_norms

STAGES = {1: "optimizer state", 2: "and gradients", 3: "and parameters"}


class ZeroError(PlaitError):
    """A program zero cannot shard, with what to change."""


def _insert(op: Operation, before: Operation, name: str) -> SSAValue:
    op.location = before.location
    op.results[0].name_hint = name
    Rewriter.insert_op(op, InsertPoint.before(before))
    return op.results[0]


IN_FLIGHT = 2  # gradient buckets a rank has started to reduce and not waited for, at most


def _bound_in_flight(block: Block) -> None:
    """Wait for each async reduce-scatter before the one IN_FLIGHT after it
    starts (as FSDP bounds them): its input, a whole bucket, dies there, where
    otherwise every bucket would live until the update reads the first piece
    (in reverse order of backward's buckets)."""
    starts = [op for op in block.ops if isinstance(op, ReduceScatterOp) and op.is_async is not None]
    position = {op: i for i, op in enumerate(block.ops)}  # (moving a wait keeps the others' order)
    for start, later in zip(starts, starts[IN_FLIGHT:]):
        for use in list(start.results[0].uses):
            wait = use.operation
            if isinstance(wait, WaitOp) and position[wait] > position[later]:
                wait.detach()
                Rewriter.insert_op(wait, InsertPoint.before(later))


def _hint(value: SSAValue) -> str:
    return value.name_hint or "value"


def _flattened(value: SSAValue, before: Operation) -> SSAValue:
    """`value` as one dim (a view when it is contiguous)."""
    t = value.type
    return insert_call(
        before,
        f"{_hint(value)}_flat",
        "aten::reshape",
        [value],
        [Operand(0), (-1,)],
        t.with_shape([math.prod(t.shape)]),
    )


def _padded(flat: SSAValue, length: int, before: Operation) -> SSAValue:
    """A flat value with zeros after it, up to `length` (n equal pieces)."""
    numel = flat.type.shape[0]
    if numel == length:
        return flat
    return insert_call(
        before,
        f"{_hint(flat)}_padded",
        "aten::constant_pad_nd",
        [flat],
        [Operand(0), (0, length - numel), 0.0],
        flat.type.with_shape([length]),
    )


@dataclass
class _Updated:
    """A parameter whose update ran on this rank's slice."""

    root: SSAValue  # the parameter, whole
    piece: SSAValue  # its updated flat slice (stage 3: the piece it is held as)


class _StepZero:
    """ZeRO's rewrite of one @train_step or @accumulate block along the data axis `axis`."""

    def __init__(
        self,
        block: Block,
        axis: str,
        n: int,
        axes,
        stage: int,
        bucket_bytes: float,
        split_accumulators: frozenset[str] = frozenset(),
        prefetch: int = 1,
    ):
        self.block, self.axis, self.n, self.axes = block, axis, n, tuple(axes)
        self.stage, self.bucket_bytes, self.prefetch = stage, bucket_bytes, prefetch
        self.split_accumulators = split_accumulators
        fn = block.parent_op()
        self.grads = gradients(fn)
        self.state = {
            op.weight_name: op for op in block.ops if isinstance(op, ParamOp) and op.is_state
        }
        self.known: dict[SSAValue, SSAValue] = {}  # a whole gradient -> its slice (stage 2)
        self.slices: dict[SSAValue, SSAValue] = {}  # a whole value -> its slice, made here
        self.gone: list[Operation] = []  # replaced ops, erased with what only they read
        self.held: list[ParamOp] = []  # whole state now held as pieces: erased at the end
        self.accumulating = fn.sym_name.data == ACCUMULATE
        self.accumulators: dict[SSAValue, SSAValue] = {}  # accumulator -> its piece (stage 2)

    def run(self) -> None:
        if self.stage >= 2:
            self.accumulators = self.accumulator_pieces()
        if self.accumulating:  # @accumulate: no update, the micro-batch's gradients added
            self.scatter_into_accumulators()
            held = self.accumulated() if self.stage >= 3 else []
            updated = [self.held_piece(name) for name in held]
        else:
            if self.stage >= 2:
                self.scatter_buckets()
            updated = [self.slice_update(name) for name in self.trained()]
            if self.stage >= 2:
                self.norms_from_slices()
        if self.stage >= 3:
            self.gather_before_use(updated)
        elif not self.accumulating:
            self.gather_into_parameters(updated)
        if self.stage >= 2:
            self.update_accumulators()
            _bound_in_flight(self.block)
        self.erase_gone()

    # ---- the layout -------------------------------------------------------------

    def piece_size(self, shape) -> int:
        return -(-math.prod(shape) // self.n)

    def flat_piece(self, value: SSAValue, before: Operation) -> SSAValue:
        """This rank's piece of `value` flattened and zero-padded (a view where no pad is needed)."""
        t = value.type
        size = self.piece_size(t.shape)
        x = _padded(_flattened(value, before), size * self.n, before)
        piece = LocalShardOp(x, t.with_shape([size]), self.axis, 0)
        return _insert(piece, before, f"{_hint(value)}_piece")

    def trained(self) -> list[str]:
        """The trained parameters, in the order of their updates."""
        position = {op: i for i, op in enumerate(self.block.ops)}
        names = [n for n in self.grads if n in self.state and _updates(self.state[n].result)]
        return sorted(names, key=lambda n: position[_updates(self.state[n].result)[0]])

    def accumulated(self) -> list[str]:
        """The parameters whose gradients @accumulate adds up."""
        return [
            self.state[name].attributes[STATE_OF].data
            for name in self.state
            if name.startswith(ACCUMULATOR + ".")
        ]

    def held_piece(self, name: str) -> _Updated:
        """Stage 3 in @accumulate: the parameter held as its piece (as @train_step holds it)."""
        param = self.state[name]
        shape = tuple(param.result.type.shape)
        return _Updated(param.result, self.moment_piece(param, shape, self.piece_size(shape)))

    # ---- stage 1: the update on a slice -------------------------------------------

    def slice_update(self, name: str) -> _Updated:
        """Run the optimizer's update of `name` (its in-place writes, and every op
        that reads its moments) on this rank's flat slices."""
        param = self.state[name]
        root, shape = param.result, tuple(param.result.type.shape)
        if not all(isinstance(d, int) for d in shape):
            raise ZeroError(f"{where(param)}: zero needs static shapes; '{name}' is {list(shape)}")
        chain = _updates(root)
        moments = [
            op
            for op in self.state.values()
            if STATE_OF in op.attributes
            and op.attributes[STATE_OF].data == name
            and not op.weight_name.startswith(ACCUMULATOR + ".")
        ]
        region = _region(chain, [m.result for m in moments])
        size = self.piece_size(shape)
        mapped = {m.result: self.moment_piece(m, shape, size) for m in moments}
        held = None  # stage 3: the parameter is state held as this rank's piece
        if self.stage >= 3:
            held = self.slices[root] = self.moment_piece(param, shape, size)
        position = {op: i for i, op in enumerate(self.block.ops)}
        ordered = sorted(region, key=position.__getitem__)
        for op in ordered:
            if not isinstance(op, CallOp) or any(r.type.shape != shape for r in op.results):
                raise ZeroError(
                    f"{where(op)}: the optimizer's update of '{name}' {list(shape)} has an op "
                    f"that is not element-wise on it ({op.name}); zero slices element-wise "
                    "updates only (torch.optim's AdamW, Adam, SGD)"
                )
            values = []
            for i, v in enumerate(op.operands):
                if v in mapped:
                    values.append(mapped[v])
                elif v is root and op is chain[0] and i == 0 and held is not None:
                    values.append(held)
                elif v is root and op is chain[0] and i == 0:
                    # this rank's slice of the parameter itself, updated in place
                    # (padded: a copy, which the gather copies back)
                    values.append(self.flat_piece(root, op))
                elif v.type.rank == 0:
                    values.append(v)
                elif tuple(v.type.shape) == shape:
                    values.append(self.slice_of(v, op, shape, region))
                else:
                    raise ZeroError(
                        f"{where(op)}: the optimizer's update of '{name}' reads a tensor of "
                        f"shape {list(v.type.shape)}, neither a scalar nor shaped like the parameter"
                    )
            attributes = {k: a for k, a in op.attributes.items() if k != GRAD_OF}
            new = type(op)(
                op.target_name,
                values,
                op.args,
                [r.type.with_shape([size]) for r in op.results],
                attributes,
            )
            new.location = op.location
            for old, fresh in zip(op.results, new.results):
                fresh.name_hint = old.name_hint
                mapped[old] = fresh
            Rewriter.insert_op(new, InsertPoint.before(op))
        for op in reversed(ordered):
            Rewriter.erase_op(op)
        for m in moments:
            Rewriter.erase_op(m)
        return _Updated(root, held if held is not None else mapped[chain[-1].results[0]])

    def moment_piece(self, moment: ParamOp, shape, size: int) -> SSAValue:
        """The moment's state as this rank's flat piece (placed `flat` along the axis)."""
        new = ParamOp(moment.weight_name, moment.result.type.with_shape([size]), moment.kind.data)
        new.attributes.update(moment.attributes)
        placed = moment.attributes.get(PLACEMENTS_ATTR)
        placements = list(placed.data) if placed else [REPLICATE] * len(self.axes)
        placements[self.axes.index(self.axis)] = flat(shape)
        new.attributes[PLACEMENTS_ATTR] = PlacementsAttr(tuple(placements))
        new.location = moment.location
        new.result.name_hint = moment.result.name_hint
        Rewriter.insert_op(new, InsertPoint.after(moment))
        return new.result

    def slice_of(self, value: SSAValue, before: Operation, shape, region) -> SSAValue:
        """This rank's slice of `value`: known (a scattered gradient), computed on
        slices where `value` is element-wise math read only by the update (the
        clipped gradient), else cut from the whole value."""
        if value in self.known:
            return self.known[value]
        if value in self.slices:
            return self.slices[value]
        owner = value.owner
        if (
            isinstance(owner, ElementwiseOp)
            and len(owner.results) == 1
            and all(u.operation in region for u in value.uses)
            and all(v.type.rank == 0 or tuple(v.type.shape) == shape for v in owner.operands)
        ):
            values = [
                v if v.type.rank == 0 else self.slice_of(v, before, shape, region)
                for v in owner.operands
            ]
            result = value.type.with_shape([self.piece_size(shape)])
            attributes = {k: a for k, a in owner.attributes.items() if k != GRAD_OF}
            new = type(owner)(owner.target_name, values, owner.args, [result], attributes)
            piece = _insert(new, before, f"{_hint(value)}_piece")
            self.gone.append(owner)
        else:
            piece = self.flat_piece(value, before)
        self.slices[value] = piece
        return piece

    # ---- stage 1: whole parameters again --------------------------------------------

    def gather_into_parameters(self, updated: list[_Updated]) -> None:
        """Each updated slice back into its parameter, in place, as soon as it is
        made (plait.all_gather_into: no gathered copy; ZeroRedundancyOptimizer
        broadcasts into the parameters likewise), all waited for at the step's
        end: they hold no buffer to free, so the updates need not wait."""
        for u in updated:
            start = GatherIntoOp(u.piece, u.root, self.axis, is_async=True)
            gathering = _insert(start, u.piece.owner.next_op, f"{_hint(u.root)}_gathering")
            _insert(WaitOp(gathering), self.block.last_op, f"{_hint(u.root)}_whole")

    # ---- stage 3: parameters gathered before use -------------------------------------

    def gather_before_use(self, updated: list[_Updated]) -> None:
        """Each parameter held as a piece is gathered whole before its first use
        in forward (what the loss is computed from) and again before its first
        in backward, so that each whole copy dies after its phase (a view kept
        from forward is made again from the backward copy). Gathers go in
        buckets of about `bucket_bytes`, in the order of first use, each
        started where the bucket `prefetch` before it is first used."""
        forward = _ancestors(self.block.last_op)
        readers = {u.root: _readers(u.root) for u in updated}
        phases = [
            [(u, [r for r in readers[u.root] if (r[0] in forward) == in_forward]) for u in updated]
            for in_forward in (True, False)
        ]
        position = {op: i for i, op in enumerate(self.block.ops)}
        buckets = []
        for phase in phases:
            used = sorted(
                ((u, leaves) for u, leaves in phase if leaves),
                key=lambda item: min(position[r[0]] for r in item[1]),
            )
            buckets += _buckets(used, lambda item: item[0].piece, self.bucket_bytes)
        firsts = [min((r[0] for _, ls in b for r in ls), key=position.__getitem__) for b in buckets]
        for i, bucket in enumerate(buckets):
            start_at = firsts[max(i - self.prefetch, 0)]
            self.gather_for(bucket, start_at, firsts[i])
        for u in updated:
            self.gone.extend(view for _, _, views in readers[u.root] for view in views)
            self.held.append(u.root.owner)

    def gather_for(self, bucket, start_at: Operation, first: Operation) -> None:
        """One bucket's async all-gather of pieces into whole parameters, whose
        views its readers read instead of the old whole parameters."""
        pieces = [u.piece for u, _ in bucket]
        wholes = self._gather(pieces, start_at, first, [u.root for u, _ in bucket])
        position = {op: i for i, op in enumerate(self.block.ops)}
        for (_, leaves), whole in zip(bucket, wholes):
            made: dict[Operation, SSAValue] = {}  # an old view -> its copy on `whole`
            for reader, index, views in sorted(leaves, key=lambda r: position[r[0]]):
                value = whole
                for view in views:
                    if view not in made:
                        again = type(view)(
                            view.target_name, [value], view.args, [view.results[0].type]
                        )
                        made[view] = _insert(again, reader, _hint(view.results[0]))
                    value = made[view]
                reader.operands[index] = value

    def _gather(self, pieces, start_at: Operation, first: Operation, roots) -> list[SSAValue]:
        t = pieces[0].type
        total = sum(p.type.shape[0] for p in pieces)
        cat = insert_call(
            start_at,
            "param_bucket",
            "aten::cat",
            pieces,
            [tuple(Operand(i) for i in range(len(pieces))), 0],
            t.with_shape([total]),
        )
        start = _insert(
            AllGatherOp(cat, t.with_shape([self.n * total]), self.axis, 0, is_async=True),
            start_at,
            "param_bucket_gathering",
        )
        waited = _insert(WaitOp(start), first, "param_bucket_gathered")
        return self._unpack(waited, pieces, roots, first)

    def _unpack(self, waited, pieces, roots, before: Operation) -> list[SSAValue]:
        """The whole tensors in a gathered bucket: rank r's pieces lie in row r."""
        t = pieces[0].type
        total = sum(p.type.shape[0] for p in pieces)
        rows = insert_call(
            before,
            "param_rows",
            "aten::view",
            [waited],
            [Operand(0), (self.n, total)],
            t.with_shape([self.n, total]),
        )
        wholes, offset = [], 0
        for piece, root in zip(pieces, roots):
            size, numel, name = piece.type.shape[0], math.prod(root.type.shape), _hint(root)
            cut = insert_call(
                before,
                f"{name}_pieces",
                "aten::slice.Tensor",
                [rows],
                [Operand(0), 1, offset, offset + size],
                t.with_shape([self.n, size]),
            )
            whole = insert_call(
                before,
                f"{name}_flat",
                "aten::reshape",
                [cut],
                [Operand(0), (self.n * size,)],
                t.with_shape([self.n * size]),
            )
            if self.n * size != numel:
                whole = insert_call(
                    before,
                    f"{name}_unpadded",
                    "aten::slice.Tensor",
                    [whole],
                    [Operand(0), 0, 0, numel],
                    t.with_shape([numel]),
                )
            wholes.append(
                insert_call(
                    before,
                    f"{name}_whole",
                    "aten::view",
                    [whole],
                    [Operand(0), tuple(root.type.shape)],
                    root.type,
                )
            )
            offset += size
        return wholes

    # ---- stage 2: gradients ---------------------------------------------------------

    def scatter_buckets(self) -> None:
        """Each gradient bucket's all-reduce (`grad_buckets`) becomes a reduce-
        scatter of the gradients' flat pieces: rank r receives piece r of every
        gradient in the bucket, summed; the pieces carry the gradients' marks.
        A gradient that is not shaped as its parameter (reduced before a tensor
        axis slices it) stays whole, all-reduced in a bucket of its own."""
        marked = {v: name for name, v in self.grads.items()}
        for start in [op for op in self.block.ops if isinstance(op, AllReduceOp)]:
            bucket = _bucket(start, self.axis)
            if bucket is None:
                continue
            flats, wait, wholes = bucket
            members = [
                (f, whole, _gradient_name(f.owner.operands[0], marked))
                for f, whole in zip(flats, wholes)
            ]
            shaped = [m for m in members if m[1].type == self.state[m[2]].result.type]
            if not shaped:
                continue
            self.scatter([self.after_accumulated(m, start) for m in shaped], start, wait)
            rest = [m for m in members if m not in shaped]
            if rest:
                self.reduce(rest, start, wait)
            self.gone.extend(w.owner for w in wholes)

    def after_accumulated(self, member, before: Operation):
        """A bucket's member: (flat gradient, whole, name, piece of the accumulator
        the reduced micro-batch's piece is added to, or None). The step's gradient
        accumulator + last micro-batch's becomes the accumulator's piece + the
        scattered piece of the last micro-batch's gradient."""
        flat, whole, name = member
        total = flat.owner.operands[0].owner
        if not (
            isinstance(total, CallOp)
            and total.target_name == "aten::add.Tensor"
            and total.operands[0] in self.accumulators
        ):
            return (*member, None)
        g = total.operands[1]
        flat = _flattened(g, before)
        return flat, whole, name, self.accumulators[total.operands[0]]

    def scatter_into_accumulators(self) -> None:
        """@accumulate: each micro-batch's gradients reduce-scattered in async
        buckets (in the order backward makes them), each rank adding its pieces
        into its pieces of the accumulators."""
        adds = [op for a in self.accumulators for op in _updates(a)]
        position = {op: i for i, op in enumerate(self.block.ops)}
        adds.sort(key=lambda op: position[op.operands[1].owner])
        for bucket in _buckets(adds, lambda op: op.operands[1], self.bucket_bytes):
            position = {op: i for i, op in enumerate(self.block.ops)}
            start_at = max((op.operands[1].owner for op in bucket), key=position.__getitem__)
            start_at = start_at.next_op
            members = []
            for op in bucket:
                g = op.operands[1]
                flat = _flattened(g, start_at)
                name = op.operands[0].owner.attributes[STATE_OF].data
                members.append((flat, g, name, None))
            first = min(bucket, key=position.__getitem__)
            self.scatter(members, start_at, first)

    def accumulator_pieces(self) -> dict[SSAValue, SSAValue]:
        """The gradient accumulators to split (`scattered_accumulators`), as this
        rank's pieces."""
        pieces = {}
        for name, param in self.state.items():
            if name not in self.split_accumulators:
                continue
            shape = tuple(param.result.type.shape)
            pieces[param.result] = self.moment_piece(param, shape, self.piece_size(shape))
            self.held.append(param)
        return pieces

    def update_accumulators(self) -> None:
        """The accumulators' in-place updates (add a micro-batch's gradient, zero)
        on their pieces."""
        for whole, piece in self.accumulators.items():
            for op in _updates(whole):
                values = [piece]
                for v in op.operands[1:]:
                    if v not in self.known and v.type.rank:
                        raise ZeroError(
                            f"{where(op)}: updates a gradient accumulator with a whole tensor; "
                            "zero{stage=2} holds accumulators as pieces"
                        )
                    values.append(self.known.get(v, v))
                again = type(op)(op.target_name, values, op.args, [piece.type], {})
                piece = _insert(again, op, _hint(op.results[0]))
                op.results[0].replace_all_uses_with(piece)
                Rewriter.erase_op(op)

    def _cat(self, values, dim: int, before: Operation, shape) -> SSAValue:
        return insert_call(
            before,
            "grad_bucket",
            "aten::cat",
            values,
            [tuple(Operand(i) for i in range(len(values))), dim],
            values[0].type.with_shape(shape),
        )

    def scatter(self, members, start: Operation, wait: Operation) -> None:
        """Reduce-scatter (flat, whole, name, accumulator piece or None) members
        in one async bucket started before `start`, waited for before `wait`."""
        rows, offsets, total = [], [], 0
        for f, _, _, _ in members:
            size = self.piece_size(f.type.shape)
            x = _padded(f, size * self.n, start)
            rows.append(
                insert_call(
                    start,
                    f"{_hint(f)}_rows",
                    "aten::view",
                    [x],
                    [Operand(0), (self.n, size)],
                    f.type.with_shape([self.n, size]),
                )
            )
            offsets.append((total, size))
            total += size
        t = rows[0].type
        cat = self._cat(rows, 1, start, [self.n, total])
        flat_bucket = insert_call(
            start,
            "grad_bucket",
            "aten::reshape",
            [cat],
            [Operand(0), (self.n * total,)],
            t.with_shape([self.n * total]),
        )
        scatter = ReduceScatterOp(
            flat_bucket, t.with_shape([total]), self.axis, 0, "sum", is_async=True
        )
        scattering = _insert(scatter, start, "grad_bucket_scattering")
        waited = _insert(WaitOp(scattering), wait, "grad_bucket_scattered")
        for (_, whole, name, accumulated), (offset, size) in zip(members, offsets):
            piece = insert_call(
                wait,
                f"grad_piece.{name}",
                "aten::slice.Tensor",
                [waited],
                [Operand(0), 0, offset, offset + size],
                t.with_shape([size]),
            )
            if accumulated is not None:  # the accumulator's, then the last micro-batch's
                piece = insert_call(
                    wait,
                    f"grad.{name}",
                    "aten::add.Tensor",
                    [accumulated, piece],
                    [Operand(0), Operand(1)],
                    piece.type,
                )
            self.known[whole] = piece
            if name in self.grads:  # (@accumulate marks none)
                _move_mark(self.grads[name], piece, name)

    def reduce(self, members, start: AllReduceOp, wait: WaitOp) -> None:
        """The bucket's other gradients all-reduced whole, as before."""
        flats = [f for f, _, _ in members]
        total = sum(f.type.shape[0] for f in flats)
        cat = self._cat(flats, 0, start, [total])
        reducing = _insert(AllReduceOp(cat, self.axis, "sum", True), start, "grad_bucket")
        waited = _insert(WaitOp(reducing), wait, "grad_bucket_reduced")
        offset = 0
        for f, whole, _ in members:
            size = f.type.shape[0]
            piece = insert_call(
                wait,
                "grad_piece",
                "aten::slice.Tensor",
                [waited],
                [Operand(0), 0, offset, offset + size],
                f.type,
            )
            view = insert_call(
                wait,
                _hint(whole),
                "aten::view",
                [piece],
                [Operand(0), whole.type.shape],
                whole.type,
            )
            whole.replace_all_uses_with(view)
            offset += size

    def norms_from_slices(self) -> None:
        """Clipping's global norm over scattered gradients: each rank sums the
        squares of its pieces (zeros pad: they add none), of every gradient
        (those kept whole: a piece of them), and one all-reduce totals them."""
        squares_for_global_norms(self.block, insert_call)  # (already so under a tensor axis)
        stacks = {
            _stacked(total)
            for whole in self.known
            for use in whole.uses
            if (total := _square_sum(use.operation, whole)) is not None
        }
        for stack in stacks:
            if stack is None:
                raise ZeroError(
                    "a gradient's sum of squares is read other than by clipping's global "
                    "norm, which zero{stage=2} cannot compute from slices; use zero{stage=1}"
                )
            for total in map(_unscaled, stack.operands):
                squares = total.operands[0].owner if isinstance(total, CallOp) else None
                g = squares.operands[0] if isinstance(squares, CallOp) else None
                if g is None or _square_sum(squares, g) is not total:
                    raise ZeroError(
                        f"{where(stack)}: clipping's global norm stacks a value that is "
                        "no gradient's sum of squares; use zero{stage=1}"
                    )
                piece = self.known.get(g) or self.flat_piece(g, squares)
                product = insert_call(
                    squares,
                    "grad_squares",
                    "aten::mul.Tensor",
                    [piece, piece],
                    [Operand(0), Operand(1)],
                    piece.type,
                )
                part = insert_call(
                    squares,
                    "grad_square_sum",
                    "aten::sum",
                    [product],
                    [Operand(0)],
                    total.results[0].type,
                )
                total.results[0].replace_all_uses_with(part)
                self.gone.append(total)
            reduced = AllReduceOp(stack.results[0], self.axis, "sum")
            reduced.location = stack.location
            reduced.results[0].name_hint = "grad_square_sums"
            Rewriter.insert_op(reduced, InsertPoint.after(stack))
            stack.results[0].replace_all_uses_with(reduced.results[0])
            reduced.operands[0] = stack.results[0]
        for whole in self.known:
            for use in whole.uses:
                if use.operation not in self.gone and _square_sum(use.operation, whole) is None:
                    raise ZeroError(
                        f"{where(use.operation)}: reads the whole gradient '{_hint(whole)}', of "
                        "which zero{stage=2} keeps only this rank's slice; use zero{stage=1}"
                    )

    def slices_from_pieces(self) -> None:
        """Where stage 1 cut this rank's slice from a whole reduced gradient
        (flattened, padded, `local_shard` along the axis), the scattered
        piece is that slice: the same elements of the same padded layout."""
        for whole, piece in self.known.items():
            for use in list(whole.uses):
                chain, op = [], use.operation
                while (
                    isinstance(op, CallOp)
                    and op.target_name in ("aten::reshape", "aten::constant_pad_nd")
                    and op.results[0].has_one_use()
                ):
                    chain.append(op)
                    op = next(iter(op.results[0].uses)).operation
                if (
                    isinstance(op, LocalShardOp)
                    and op.axis.data == self.axis
                    and op.results[0].type == piece.type
                ):
                    op.results[0].replace_all_uses_with(piece)
                    Rewriter.erase_op(op)
                    self.gone.extend(chain)

    # ---- cleaning up ------------------------------------------------------------------

    def erase_gone(self) -> None:
        """Erase the replaced ops and what only they read (the old buckets)."""
        todo = list(self.gone)
        while todo:
            op = todo.pop()
            if op.parent is not self.block or any(r.uses for r in op.results):
                continue
            if isinstance(op, CallOp) and writes_input(op.target_name):
                continue
            if not isinstance(op, (CallOp, CollectiveOp, WaitOp)):
                continue
            owners = [v.owner for v in op.operands if isinstance(v.owner, Operation)]
            Rewriter.erase_op(op)
            todo.extend(owners)
        for param in self.held:
            if param.result.uses:
                reader = next(iter(param.result.uses)).operation
                raise ZeroError(
                    f"{where(reader)}: reads '{param.weight_name}' whole, which "
                    f"zero{{stage={self.stage}}} holds as this rank's piece"
                )
            Rewriter.erase_op(param)


def scatter_reduced_gradients(fn: func.FuncOp, axis: str, n: int, axes) -> None:
    """A pipelined rank's update after zero{stage=1} (`pipeline` calls it):
    each gradient bucket's all-reduce over `axis` becomes a reduce-scatter,
    as the update reads only this rank's slice of each reduced gradient; a
    rank sends and receives half the bytes of an all-reduce (FSDP's
    reduction under torchtitan's pipelines). Clipping's norm then sums the
    slices' squares over the axis. The accumulators stay whole: every
    micro-batch adds into them."""
    zero = _StepZero(fn.body.blocks.first, axis, n, axes, stage=2, bucket_bytes=0.0)
    zero.scatter_buckets()
    zero.slices_from_pieces()
    zero.norms_from_slices()
    zero.erase_gone()


def _buckets(items: list, piece, bucket_bytes: float) -> list[list]:
    """`items` in order, in runs of about `bucket_bytes` of one dtype (of their `piece`)."""
    buckets: list[list] = []
    size = 0.0
    for item in items:
        t = piece(item).type
        if not buckets or size >= bucket_bytes or piece(buckets[-1][0]).type.dtype != t.dtype:
            buckets.append([])
            size = 0.0
        buckets[-1].append(item)
        size += t.nbytes
    return buckets


def scattered_accumulators(step: Block, axis: str) -> frozenset[str]:
    """The gradient accumulators whose sum with the last micro-batch's gradient
    @train_step reduces in a bucket (and only there), shaped as their parameter:
    those stage 2 splits, in @train_step and @accumulate alike."""
    params = {op.weight_name: op for op in step.ops if isinstance(op, ParamOp) and op.is_state}
    names = set()
    for name, param in params.items():
        if not name.startswith(ACCUMULATOR + ".") or STATE_OF not in param.attributes:
            continue
        owner = params.get(param.attributes[STATE_OF].data)
        reads = [
            u.operation
            for u in param.result.uses
            if not (
                u.index == 0
                and isinstance(u.operation, CallOp)
                and writes_input(u.operation.target_name)
            )
        ]
        if owner is None or param.result.type != owner.result.type or len(reads) != 1:
            continue
        total = reads[0]
        flats = [u.operation for u in total.results[0].uses] if total.results else []
        if (
            getattr(total, "target_name", None) == "aten::add.Tensor"
            and total.operands[0] is param.result
            and len(flats) == 1
            and any(
                isinstance(s, AllReduceOp) and _bucket(s, axis) is not None
                for u in flats[0].results[0].uses
                for s in (v.operation for v in u.operation.results[0].uses)
            )
        ):
            names.add(name)
    return frozenset(names)


def _ancestors(op: Operation) -> set[Operation]:
    """The ops whose results `op` reads, transitively."""
    found: set[Operation] = set()
    todo = [op]
    while todo:
        for v in todo.pop().operands:
            owner = v.owner
            if isinstance(owner, Operation) and owner not in found:
                found.add(owner)
                todo.append(owner)
    return found


def _readers(root: SSAValue) -> list[tuple[Operation, int, list[CallOp]]]:
    """The ops that read `root` other than through views: (op, operand index,
    the views between, outermost first)."""
    found = []
    todo = [(root, [])]
    while todo:
        value, views = todo.pop()
        for use in value.uses:
            op = use.operation
            if isinstance(op, CallOp) and op.target_name in _VIEWS and len(op.operands) == 1:
                todo.append((op.results[0], [*views, op]))
            else:
                found.append((op, use.index, views))
    return found


def _updates(value: SSAValue) -> list[CallOp]:
    """The in-place calls that overwrite the state `value`, one on another's result."""
    chain = []
    while True:
        writes = [
            u.operation
            for u in value.uses
            if u.index == 0
            and isinstance(u.operation, CallOp)
            and writes_input(u.operation.target_name)
        ]
        if not writes:
            return chain
        chain.append(writes[0])
        value = writes[0].results[0]


def _region(chain: list[CallOp], moments: list[SSAValue]) -> set[Operation]:
    """A parameter's update: its in-place writes and every op that reads
    (transitively) their results or the moments."""
    region: set[Operation] = set(chain)
    todo = [*moments, *(r for op in chain for r in op.results)]
    while todo:
        for use in todo.pop().uses:
            if use.operation not in region:
                region.add(use.operation)
                todo.extend(use.operation.results)
    return region


def _bucket(start: AllReduceOp, axis: str):
    """A gradient bucket's all-reduce (`grad_buckets._reduce_bucket`): (the flat
    gradients it concatenates, its wait, the whole gradients cut from it in
    order), or None for another all-reduce."""
    parts = bucket_parts(start, axis)
    if parts is None:
        return None
    flats, wait, cuts = parts
    return flats, wait, [next(iter(c.results[0].uses)).operation.results[0] for c in cuts]


def _gradient_name(value: SSAValue, marked: dict[SSAValue, str]) -> str:
    """The parameter whose marked gradient `value` is (or is a view of)."""
    for _ in range(4):
        if value in marked:
            return marked[value]
        value = value.owner.operands[0]
    raise ZeroError(
        f"{where(value.owner)}: a gradient bucket holds a value that is no marked gradient"
    )


def _move_mark(old: SSAValue, new: SSAValue, name: str) -> None:
    """The gradient of `name` the optimizer reads is now `new`."""
    op = old.owner
    mark = [a.data for a in op.attributes[GRAD_OF].data]
    mark[mark.index(name)] = ""
    if any(mark):
        op.attributes[GRAD_OF] = ArrayAttr([StringAttr(m) for m in mark])
    else:
        del op.attributes[GRAD_OF]
    mark_gradient(new, name)


def _scaling(op: Operation) -> bool:
    """A scalar's element-wise scaling (a tensor axis's partial-sum mask)."""
    return isinstance(op, ElementwiseOp) and op.results[0].type.rank == 0


def _stacked(total: CallOp) -> CallOp | None:
    """The stack a square sum reaches through scalings, if it reaches one."""
    value = total.results[0]
    while True:
        readers = [u.operation for u in value.uses]
        if len(readers) != 1:
            return None
        if isinstance(readers[0], CallOp) and readers[0].target_name == "aten::stack":
            return readers[0]
        if not _scaling(readers[0]):
            return None
        value = readers[0].results[0]


def _unscaled(value: SSAValue) -> Operation:
    """The op that makes `value` before any scalings."""
    while _scaling(value.owner):
        value = value.owner.operands[0]
    return value.owner


def _square_sum(op: Operation, g: SSAValue) -> CallOp | None:
    """The full sum of `op` = g * g, if that is what `op` feeds."""
    if not (
        isinstance(op, CallOp)
        and op.target_name == "aten::mul.Tensor"
        and list(op.operands) == [g, g]
    ):
        return None
    readers = [u.operation for u in op.results[0].uses]
    if (
        len(readers) != 1
        or not isinstance(readers[0], CallOp)
        or readers[0].target_name != "aten::sum"
    ):
        return None
    return readers[0]


@dataclass(frozen=True)
class Zero(Pass):
    name = "zero"
    summary = "ZeRO: optimizer state (1), gradients (2), parameters (3) split over the data axis"
    # it needs shard's output, a step over a data axis, but does not `require` shard: the
    # pass manager would add shard{mesh=tp:2} where none ran before, and a dump taken
    # after shard (`plait opt step.mlir --pipeline zero`) could not be replayed

    stage: int = 1  # 1: optimizer state; 2: and gradients; 3: and parameters
    bucket_mb: float = BUCKET_MB  # parameters gathered (3), accumulators scattered (2), in buckets
    prefetch: int = 1  # stage 3: buckets gathered ahead of the one in use

    def __post_init__(self):
        super().__post_init__()
        if self.prefetch < 1:
            raise OptionError(
                f"prefetch is how many buckets are gathered ahead, >= 1, not {self.prefetch}",
                "prefetch",
            )
        if self.stage not in STAGES:
            choices = ", ".join(f"{s} ({what})" for s, what in STAGES.items())
            raise OptionError(f"stage is one of {choices}, not {self.stage}", "stage")
        if not self.bucket_mb > 0:
            raise OptionError(
                f"bucket_mb is MiB per parameter bucket, > 0, not {self.bucket_mb:g}", "bucket_mb"
            )

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        axes = mesh_axes(op)
        data = [a for a, n in axes.items() if a in DATA_AXES and n > 1]
        here = f"zero{{stage={self.stage}}}"
        if not data:
            mesh = ",".join(f"{a}:{n}" for a, n in axes.items()) or "none (not sharded)"
            raise ZeroError(
                f"{here} shards over a data-parallel axis ({', '.join(DATA_AXES)}), but the "
                f"program's mesh is {mesh}; shard with one first: "
                "shard{mesh=dp:N} or shard{mesh=dp:N,tp:M} before zero in the pipeline"
            )
        functions = {f.sym_name.data: f for f in op.ops if isinstance(f, func.FuncOp)}
        if TRAIN_STEP not in functions:
            raise ZeroError(
                f"{here} shards a training step's state, and the program has no @{TRAIN_STEP}; "
                "compile it with plait.compile_training"
            )
        if any(on_host(o) for o in functions[TRAIN_STEP].walk()):
            raise ZeroError(
                f"{here} after offload: the optimizer's update already runs on the host; "
                "put zero before offload in the pipeline (offload then keeps each rank's pieces)"
            )
        axis = data[0]
        # stage 1 leaves @accumulate as it is: its accumulators stay whole
        names = [TRAIN_STEP, ACCUMULATE] if self.stage >= 2 else [TRAIN_STEP]
        split = scattered_accumulators(functions[TRAIN_STEP].body.blocks.first, axis)
        for name in (n for n in names if n in functions):
            block = functions[name].body.blocks.first
            bucket_bytes = self.bucket_mb * 2**20
            _StepZero(
                block, axis, axes[axis], axes, self.stage, bucket_bytes, split, self.prefetch
            ).run()
