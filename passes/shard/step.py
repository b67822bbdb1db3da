"""The shard pass's walk over a training step (@train_step, @accumulate).

A step is one function: forward, backward and the optimizer's update of
program state (`ir.training`). The walk is the shard pass's, with the rules
of `step_rules`, and these duties of its own:

- Each piece of state takes one placement for the whole step, because it is
  updated in place. A parameter's is decided where a rule first asks for it:
  views of it (`t(W)`) wait until a matrix product places it by Megatron's
  pairing; any other use before that keeps it whole. Its optimizer moments
  and gradient accumulator (`plait.state_of`) are then placed alike, and
  along a data axis an accumulator holds this rank's partial sum (no
  gradient is reduced until the step's last micro-batch).
- A partial sum read by more than one op is reduced once, where it is made
  (Megatron's single all-reduce of an input gradient), not once per reader.
- Losses averaged over split rows are rewritten to average over the whole
  batch: nll_loss sums its terms and their weights, and all-reduces give the
  global mean and the total weight its backward divides by. Without class
  weights the total weight is the count of kept labels: its async all-reduce
  starts as soon as the labels are there and is waited for just before
  backward reads it, and the loss's sum is waited for at the step's output,
  so neither blocks between the loss and backward (DDP has no collective
  there either).
- Gradient clipping's global norm over split gradients becomes partial sums
  of squares with one all-reduce.
- Batch norm over split rows normalizes with the whole batch's statistics,
  as SyncBatchNorm does (`step_batch_norm`).
- Over a tensor axis, the experts of mixture-of-experts layers split by
  expert, as in inference (`step_experts`).
"""

from __future__ import annotations

from xdsl.ir import Operation, SSAValue
from xdsl.rewriter import InsertPoint, Rewriter

from ...ir.args import Operand, Tag
from ...ir.attrs import PLACEMENTS_ATTR, REPLICATE, Placement, PlacementsAttr, partial, shard
from ...ir.ops import AllReduceOp, CallOp, ParamOp, WaitOp, call_op_class
from ...ir.schema import writes_input
from ...ir.training import ACCUMULATOR, GRAD_OF, STATE_OF
from ...ir.types import TensorType
from ..reorder import hoist_chain, sink_all
from .rules import Decision, Parallel, _moved_dim, divides, local_type
from .shard import _Sharder, _with_args, insert_call
from .split_classes import split_classes
from .step_batch_norm import sync_batch_norm, sync_batch_norm_backward
from .step_experts import StepExperts
from .step_rules import decide_step

R = REPLICATE
SUM = partial("sum")

# single-operand views a parameter reaches its products through (`t(W)`)
_VIEWS = frozenset(
    "aten::" + name
    for name in "t transpose.int permute view _unsafe_view reshape unsqueeze squeeze.dim "
    "detach alias".split()
)
_SAME = ("aten::detach", "aten::alias")
# ops that read only their (first) operand's shape and dtype
_SHAPE_ONLY = frozenset(
    "aten::" + n
    for n in ("ones_like", "zeros_like", "empty_like", "new_zeros", "new_ones", "new_empty")
)


class StepSharding:
    """The placements of a training step's state, and its rewrites, along one axis."""

    def __init__(self, sharder: _Sharder):
        self.s = sharder
        self.tensor = not sharder.data
        block = sharder.block
        self.roots = {op.result: op for op in block.ops if isinstance(op, ParamOp) and op.is_state}
        self.placed: dict[str, Placement] = {}  # state name -> its placement
        self.deferred: dict[SSAValue, list[CallOp]] = {}  # unplaced root -> views of it
        self.root_of: dict[SSAValue, SSAValue] = {}  # a deferred view -> its root
        self._first_rank: SSAValue | None = None
        self._late: list[tuple[list[Operation], SSAValue]] = []  # waits to sink, after the walk
        self.class_labels: dict = {}  # (labels, classes) -> labels into this rank's classes
        self.experts = StepExperts(self)  # split over a tensor axis
        if sharder.data:
            for op in self.roots.values():
                if op.weight_name.startswith(ACCUMULATOR + "."):
                    self._mark(op, SUM)
        else:
            squares_for_global_norms(block, insert_call)

    # ---- state ------------------------------------------------------------------

    def _mark(self, param: ParamOp, placement: Placement) -> None:
        """Record `placement` along this axis in the param's placements."""
        placed = param.attributes.get(PLACEMENTS_ATTR)
        axes = self.s.axes
        placements = list(placed.data) if placed else [R] * len(axes)
        placements[axes.index(self.s.axis)] = placement
        param.attributes[PLACEMENTS_ATTR] = PlacementsAttr(tuple(placements))
        self.s.placement[param.result] = placement

    def _root(self, value: SSAValue) -> SSAValue | None:
        """The unplaced state param `value` is (a view of), if any: only a
        tensor axis splits state."""
        if not self.tensor:
            return None
        root = value if value in self.roots else self.root_of.get(value)
        if root is None or self.roots[root].weight_name in self.placed:
            return None
        return root

    def place(self, root: SSAValue, placement: Placement) -> None:
        """Give the state param `root` its placement for the whole step; the
        views that waited for it are placed now, after it."""
        param = self.roots[root]
        self.placed[param.weight_name] = placement
        views = self.deferred.pop(root, [])
        if placement.kind != "shard":  # whole: the waiting views stand as they are
            return
        sharded = self.s._sharded_param(param, placement)
        if STATE_OF in param.attributes:  # a moment or accumulator stays its parameter's
            sharded.owner.attributes[STATE_OF] = param.attributes[STATE_OF]
        self.s.params.add(sharded)
        root.replace_all_uses_with(sharded)
        for view in views:
            self.call(view)

    def _place_like_owner(self, op: CallOp) -> None:
        """Optimizer moments and accumulators take their parameter's placement."""
        for value in op.inputs:
            root = self._root(value)
            if root is None or STATE_OF not in self.roots[root].attributes:
                continue
            owner = self.roots[root].attributes[STATE_OF].data
            self.place(root, self.placed.get(owner, R))

    def _defer(self, op: CallOp) -> bool:
        """A view of an unplaced parameter waits for the parameter's placement."""
        if op.target_name not in _VIEWS or len(op.inputs) != 1 or len(op.results) != 1:
            return False
        root = self._root(op.inputs[0])
        if root is None:
            return False
        self.deferred.setdefault(root, []).append(op)
        self.root_of[op.results[0]] = root
        return True

    def _root_placement(self, value: SSAValue, root: SSAValue, want: Placement):
        """The root's placement that gives `want` at its view `value`, or None."""
        dim = want.dim
        while value is not root:
            op = value.owner
            source = op.inputs[0].type
            if op.target_name not in _SAME:
                dims = [d for d in range(source.rank) if _moved_dim(op, d, source) == dim]
                if len(dims) != 1:
                    return None
                dim = dims[0]
            value = op.inputs[0]
        return (
            shard(dim)
            if divides(root.type.shape[dim], self.s.n, self.s.block.parent_op())
            else None
        )

    # ---- the walk ---------------------------------------------------------------

    def call(self, op: CallOp) -> None:
        if self.tensor:
            self._place_like_owner(op)
            if self._defer(op) or self.experts.call(op):
                return
        roots = {root for v in op.inputs if (root := self._root(v)) is not None}
        s = self.s
        # a partial sum with several readers is reduced once, at its first reader;
        # state updated in place keeps its own placement (a partial accumulator
        # is zeroed as it is, not its reduced copy)
        in_place = writes_input(op.target_name)
        arriving = [
            R
            if p.kind == "partial"
            and not (in_place and i == 0)
            and ((v, R) in s.resharded or len(_readers(v)) > 1)
            else p
            for i, (v, p) in enumerate((v, s.place(v)) for v in op.inputs)
        ]
        types = [s._full_type(v) for v in op.inputs]
        free = frozenset(i for i, v in enumerate(op.inputs) if self._root(v) in roots)
        decision = decide_step(op, arriving, types, s.n, free)
        inputs = []
        for i, want in enumerate(decision.inputs):  # placing a parameter renames operands
            inputs.append(s.reshard(op.operands[i], want, op))
        rewrite = _REWRITES.get(decision.parallel)
        if rewrite is not None:
            rewrite(self, op, inputs, decision)
        else:
            s.emit(op, inputs, decision)
        for root in roots:  # used whole before any rule split it: whole for the step
            if self.roots[root].weight_name not in self.placed:
                self.place(root, R)

    def reshard(self, value: SSAValue, have: Placement, want: Placement, before: Operation):
        """What the pass's resharding does differently in a step: placing a
        parameter when a rule first splits it (or a view of it), and making a
        replicated value a partial sum. None: the pass's own resharding."""
        if want.kind == "partial" and have == R:
            return self._partial(value, before)
        root = self._root(value)
        slots = [i for i, v in enumerate(before.operands) if v is value]
        if root is None or want.kind != "shard" or not slots:
            return None
        placement = self._root_placement(value, root, want)
        if placement is None:
            return None
        self.place(root, placement)
        return self.s.reshard(before.operands[slots[0]], want, before)

    def _partial(self, value: SSAValue, before: Operation) -> SSAValue:
        """A replicated value as a partial sum: rank 0 holds it, the others zeros."""
        if self._first_rank is None:
            first_op = self.s.block.first_op
            while isinstance(first_op, ParamOp):
                first_op = first_op.next_op
            mine = self.s._indices_here(first_op, "rank", self.s.n)
            flags = self._call(first_op, "aten::eq.Scalar", [mine], [Operand(0), 0], [1], "i1")
            self._first_rank = self._call(
                first_op, "aten::select.int", [flags], [Operand(0), 0, 0], [], "i1", "first_rank"
            )
        t = value.type
        masked = self._call(
            before,
            "aten::mul.Tensor",
            [value, self._first_rank],
            [Operand(0), Operand(1)],
            t.shape,
            t.dtype,
        )
        self.s.placement[masked] = SUM
        return masked

    def _call(self, before, target, values, args, shape, dtype, name=None) -> SSAValue:
        name = name or (values[0].name_hint or "value") + "_" + target.split("::")[1].split(".")[0]
        return insert_call(before, name, target, values, args, TensorType(list(shape), dtype))

    # ---- rewrites ---------------------------------------------------------------

    def _retire(self, op: CallOp, values: list[SSAValue], placements: list[Placement]) -> None:
        """`values` replace the results of `op`, which goes."""
        for old, new, placement in zip(op.results, values, placements):
            new.name_hint = old.name_hint
            self.s.placement[new] = placement
            old.replace_all_uses_with(new)
        Rewriter.erase_op(op)

    def split_mean(self, op: CallOp, inputs: list[SSAValue], decision: Decision) -> None:
        """A mean over a split dim: each rank's mean over its part, divided by
        the ranks, sums to the mean of the whole (the parts are equal)."""
        n = self.s.n
        result = local_type(op.results[0].type, decision.outputs[0], n)
        local = type(op)(op.target_name, inputs, op.args, [result])
        local.location = op.location
        Rewriter.insert_op(local, InsertPoint.before(op))
        scaled = self._call(
            op, "aten::div.Scalar", [local.results[0]], [Operand(0), n], result.shape, result.dtype
        )
        if GRAD_OF in op.attributes:
            scaled.owner.attributes[GRAD_OF] = op.attributes[GRAD_OF]
        self._retire(op, [scaled], decision.outputs)

    def nll_sum(self, op: CallOp, inputs: list[SSAValue], decision: Decision) -> None:
        """nll_loss over split rows (or classes): each rank sums its terms and
        the weights of its labels, all-reduces add both, and the loss is their
        quotient; the backward divides by that total weight, so each rank's
        gradients are exact. The total weight (the count of kept labels, or
        the sum of their class weights) is known from the labels before the
        loss: its all-reduce starts there, the loss sum's after the loss, and
        both are waited for where first read (`finish`), so no collective
        blocks between the loss and backward."""
        mean = op.arg("reduction") == 1
        scalar = op.results[0].type
        local = call_op_class(op.target_name)(
            op.target_name, inputs, _with_args(op, reduction=2), [scalar, scalar]
        )
        local.location = op.location
        Rewriter.insert_op(local, InsertPoint.before(op))
        target = inputs[op.arg("target").index]
        weights = inputs[op.arg("weight").index] if op.arg("weight") is not None else None
        hoist_chain(target, self.s.block)  # export puts the labels' shift by the loss
        start_at = self._after(target)
        if weights is not None:  # (a rank's slice of the class weights is cut by the loss)
            position = {o: i for i, o in enumerate(self.s.block.ops)}
            start_at = max(start_at, self._after(weights), key=position.__getitem__)
        before_them = start_at.prev_op
        start = self._start_sum(
            self._label_weights(start_at, target, weights, op, scalar), start_at
        )
        made = before_them.next_op if before_them is not None else self.s.block.first_op
        while made is not start_at:  # the loss's work, though early
            made.location = op.location
            made = made.next_op
        weight = self._wait_late(start, op, [])
        local.results[0].name_hint = "loss_sum"
        total = self._start_sum(local.results[0], op)
        chain = []
        loss = self._wait_late(total, op, chain)
        if mean:
            loss = self._call(
                op, "aten::div.Tensor", [loss, weight], [Operand(0), Operand(1)], [], scalar.dtype
            )
            chain.append(loss.owner)
        self._retire(op, [loss, weight], [R, R])

    def _label_weights(self, before, target, weights, op: CallOp, scalar) -> SSAValue:
        """This rank's total weight of its kept labels: their count, or the
        sum of their classes' weights."""
        shape = target.type.shape
        kept = self._call(
            before,
            "aten::ne.Scalar",
            [target],
            [Operand(0), op.arg("ignore_index", -100)],
            shape,
            "i1",
            "labels_kept",
        )
        if weights is not None:
            labels = self._call(
                before,
                "aten::where.ScalarOther",
                [kept, target],
                [Operand(0), Operand(1), 0],
                shape,
                target.type.dtype,
                "labels_safe",
            )
            picked = self._call(
                before,
                "aten::take",
                [weights, labels],
                [Operand(0), Operand(1)],
                shape,
                weights.type.dtype,
                "label_weights",
            )
            kept = self._call(
                before,
                "aten::mul.Tensor",
                [picked, kept],
                [Operand(0), Operand(1)],
                shape,
                weights.type.dtype,
                "label_weights_kept",
            )
        return insert_call(
            before,
            "loss_weight",
            "aten::sum",
            [kept],
            [Operand(0)],
            scalar,
            [("dtype", Tag("dtype", scalar.dtype))],
        )

    def _after(self, value: SSAValue) -> Operation:
        """The op before which `value` is first available in the step's block."""
        owner = value.owner
        if isinstance(owner, Operation) and owner.parent is self.s.block:
            return owner.next_op
        first = self.s.block.first_op
        while isinstance(first, ParamOp):
            first = first.next_op
        return first

    def _start_sum(self, value: SSAValue, before: Operation) -> AllReduceOp:
        start = AllReduceOp(value, self.s.axis, "sum", is_async=True)
        start.location = before.location
        start.result.name_hint = (value.name_hint or "value") + "_reducing"
        Rewriter.insert_op(start, InsertPoint.before(before))
        return start

    def _wait_late(self, start: AllReduceOp, before: Operation, chain: list) -> SSAValue:
        """A wait for `start`, here for now; `finish` moves it (and the pure
        ops in `chain` and after it) down to where its result is first read."""
        wait = WaitOp(start.result)
        wait.location = before.location
        wait.result.name_hint = start.input.name_hint
        Rewriter.insert_op(wait, InsertPoint.before(before))
        self.s.placement[wait.result] = R
        chain.insert(0, wait)
        self._late.append((chain, start.input))
        return wait.result

    def finish(self) -> None:
        """After the walk: each late wait, with the pure ops that only carry
        its value on (the loss's scaling), sinks to just before its first reader."""
        for chain, local in reversed(self._late):
            sink_all(_carried_on(chain, local), self.s.block)


def vocab_gradient(step: StepSharding, op: CallOp, inputs: list[SSAValue], decision) -> None:
    """The gradient of a vocab-parallel table (`step_rules._embedding_backward`):
    this rank sums the gradients of the ids it holds into its rows; the other
    ids' gradients are zeroed and go to its row 0, adding nothing. The padding
    id gets none, as torch's padding_idx gives it none."""
    s = step.s
    g, i = (op.arg(k).index for k in ("grad_output", "indices"))
    grad, ids = inputs[g], inputs[i]
    vocab = op.arg("num_weights")
    inside, safe = s.held_ids(op, ids, vocab)
    padding = op.arg("padding_idx")
    if isinstance(padding, int) and padding >= 0:
        flags = inside.type
        real = insert_call(
            op, "not_padding", "aten::ne.Scalar", [ids], [Operand(0), padding], flags
        )
        both = [Operand(0), Operand(1)]
        inside = insert_call(op, "held", "aten::logical_and", [inside, real], both, flags)
    masked = s.masked_rows(op, grad, inside, grad.type)
    Rewriter.insert_op(masked, InsertPoint.before(op))
    args = [Operand(0), Operand(1), vocab // s.n, -1, False]
    result = local_type(op.results[0].type, decision.outputs[0], s.n)
    rows = insert_call(op, "grad_rows", op.target_name, [masked.results[0], safe], args, result)
    if GRAD_OF in op.attributes:  # the table's gradient, as the optimizer reads it
        rows.owner.attributes[GRAD_OF] = op.attributes[GRAD_OF]
    step._retire(op, [rows], decision.outputs)


def _carried_on(chain: list[Operation], local: SSAValue) -> list[Operation]:
    """`chain` and the pure calls after it that read nothing but its values
    (or other late waits): moving them down changes no value they read. A
    reader of only the shape (backward's seed, ones_like(loss)) reads the
    rank's own `local` value of that type instead, and stays."""
    ops = list(chain)
    made = {r for o in ops for r in o.results}
    for o in ops:
        for r in o.results:
            for use in list(r.uses):
                user = use.operation
                if getattr(user, "target_name", None) in _SHAPE_ONLY and r.type == local.type:
                    user.operands[use.index] = local
                elif (
                    isinstance(user, CallOp)
                    and not writes_input(user.target_name)
                    and user not in ops
                    and all(v in made or isinstance(v.owner, WaitOp) for v in user.operands)
                ):
                    ops.append(user)
                    made.update(user.results)
    return ops


_REWRITES = {
    Parallel.SPLIT_MEAN: StepSharding.split_mean,
    Parallel.NLL_SUM: StepSharding.nll_sum,
    Parallel.SPLIT_CLASSES: split_classes,
    Parallel.VOCAB_GRADIENT: vocab_gradient,
    Parallel.BATCH_STATS: sync_batch_norm,
    Parallel.BATCH_STATS_BACKWARD: sync_batch_norm_backward,
}


def _readers(value: SSAValue) -> set[Operation]:
    """The ops that read `value`, not counting the in-place update that
    overwrites it, nor those that read only its shape."""
    return {
        use.operation
        for use in value.uses
        if not (
            use.index == 0
            and isinstance(use.operation, CallOp)
            and (
                writes_input(use.operation.target_name) or use.operation.target_name in _SHAPE_ONLY
            )
        )
    }


def _l2_of_all(op: Operation) -> bool:
    return (
        isinstance(op, CallOp)
        and op.target_name == "aten::linalg_vector_norm"
        and op.arg("ord", 2) == 2
        and op.arg("dim") is None
    )


def squares_for_global_norms(block, insert_call) -> None:
    """‖stack(‖g_i‖)‖ (clip_grad_norm_'s total norm) as sqrt(Σ_i sum(g_i * g_i)):
    over split gradients the sums are partial, and one all-reduce totals them.
    `insert_call(before, name, target, values, args, type)` makes the calls
    (`shard.insert_call`)."""
    for op in list(block.ops):
        stack = op.inputs[0].owner if _l2_of_all(op) else None
        if not (isinstance(stack, CallOp) and stack.target_name == "aten::stack"):
            continue
        norms = [v.owner for v in stack.inputs]
        if not all(_l2_of_all(n) and len(list(n.results[0].uses)) == 1 for n in norms):
            continue
        for norm in norms:
            g = norm.inputs[0]
            squares = insert_call(
                norm, "grad_squares", "aten::mul.Tensor", [g, g], [Operand(0), Operand(1)], g.type
            )
            total = insert_call(
                norm, "grad_square_sum", "aten::sum", [squares], [Operand(0)], norm.results[0].type
            )
            norm.results[0].replace_all_uses_with(total)
            Rewriter.erase_op(norm)
        scalar = op.results[0].type
        summed = insert_call(
            op, "grad_square_sum", "aten::sum", [stack.results[0]], [Operand(0)], scalar
        )
        root = insert_call(op, "grad_norm", "aten::sqrt", [summed], [Operand(0)], scalar)
        op.results[0].replace_all_uses_with(root)
        Rewriter.erase_op(op)
