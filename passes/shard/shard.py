"""shard{mesh=tp:N | dp:M,tp:N | ep:M,tp:N}: tensor, data and expert parallelism.

Walks the program once, deciding each op's placements from those its inputs
arrive with (`rules`; a training step's own in `step_rules`), and rewrites it into the per-rank (SPMD) program:
local shapes, weights marked with the slice each rank loads, and the
collectives where placements change:

    partial -> replicate       plait.all_reduce
    shard(d) -> replicate      plait.all_gather along d
    partial -> shard(d)        plait.reduce_scatter along d
    replicate -> shard(d)      a weight: each rank loads its slice; an
                               activation: plait.local_shard (no communication)

For a Llama block this gives Q/K/V and gate/up column-parallel, attention
by heads, O and down row-parallel, and one all-reduce after each of O and down.
Every program output is replicated.

A manual plan, like PyTorch's `parallelize_module` plans, overrides the rules
for the linear layers and embeddings whose module path matches a glob (first
match wins):

    shard{mesh=tp:4,plan=*.mlp.*:replicate,lm_head:colwise}

with `colwise` (weight split by output features), `rowwise` (by input
features; partial sums reduced) or `replicate`; the rest follow the rules.
For an embedding, as in PyTorch's plans, `rowwise` splits the vocabulary
(Megatron's vocab-parallel embedding: each rank looks up the ids it holds,
zeros for the rest, and the rows are summed) and `colwise` the embedding dim.

With `solve=ilp` an integer program picks every op's strategy instead of the
rules' greedy walk (`ilp`): the least predicted step time on a
hardware file at the given sizes, weights within `memory` bytes per device:

    shard{mesh=tp:8,solve=ilp,hardware=h100-sxm,values=batch:1,seq:2048,memory=40e9}

The module records the outcome (optimal or feasible, the objective) in
`plait.sharding`. A manual plan still decides the layers it names. A
training step is sharded by its own rules (`step`), which hold each piece of
state in one placement for forward, backward and update, a constraint the
integer program does not model yet: with `solve=ilp` the pass warns, records
the cost model's time for the step it emits (forward, backward, optimizer
and collectives) and checks its weights and state against `memory`. Given
`memory`, it first picks the step's ZeRO stage and what to rematerialize so
that a rank's predicted peak fits it, at the least predicted step time
(`memory_plan`; recorded in `plait.memory_plan`):

    shard{mesh=dp:8,solve=ilp,hardware=h100-sxm,memory=60e9}

A `dp` axis (`mesh=dp:2,tp:4`) splits the batch: after the tensor axis is
sharded, each rank of `dp` takes its slice of every input's dim 0, weights
stay whole along it, and the outputs are gathered. Symbolic dims split only
where z3 proves them divisible over their declared range.

Mixture-of-experts layers (`experts.find_expert_mlps`) split by expert: over
the tensor axis each rank computes the routed rows of its E/n experts and the
partial sums are all-reduced once; an `ep` axis (`mesh=ep:2` or `ep:2,tp:2`)
splits the batch as `dp` does and the experts over it, with one all-to-all
bringing each rank the rows of its experts and a reduce-scatter returning the
tokens' sums.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
import math
import warnings
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp, StringAttr
from xdsl.ir import Operation, SSAValue
from xdsl.rewriter import InsertPoint, Rewriter

from ...customops import experts as expert_kernel
from ...ir.args import ArgsAttr, Operand, Tag
from ...ir.attrs import (
    MESH_ATTR,
    PLACEMENTS_ATTR,
    REPLICATE,
    SHARDING_ATTR,
    MeshAttr,
    Placement,
    PlacementsAttr,
    partial,
    shard,
)
from ...ir.errors import PlaitError
from ...ir.libraries import require_library
from ...ir.ops import (
    AllGatherOp,
    AllReduceOp,
    AttentionOp,
    CallOp,
    CollectiveOp,
    EmbeddingOp,
    LinearOp,
    LocalShardOp,
    MatmulOp,
    ParamOp,
    ReduceScatterOp,
    call_op_class,
)
from ...ir.schema import argument_names
from ...ir.targets import COMPRESSED_LINEARS
from ...ir.text import module_path, where
from ...ir.training import ACCUMULATE, TRAIN_STEP
from ...ir.types import TensorType
from ..base import Pass, function_blocks
from ..options import Mesh, OptionError, Plan, SizeValues, check_all_match, check_hardware
from .experts import ExpertMLP, find_expert_mlps
from .experts import operands as grouped_operands
from .grad_buckets import BUCKET_MB, bucket_gradients
from .ilp import Solution, SolveError, solve
from .rules import (
    DATA_AXES,
    EXPERT_AXIS,
    SIZE_ARGS,
    Decision,
    Parallel,
    PlanStyle,
    block_at,
    decide,
    decide_data,
    divides,
    local_type,
    replicated,
    sizes_that_split,
    slice_range,
)


class ShardError(PlaitError):
    pass


def _unrepeated(value: SSAValue) -> SSAValue:
    """Keys or values before transformers' repeat_kv (unsqueeze(x, 2), expand,
    reshape), which copies each kv head for its query heads; else `value`."""
    source = value
    for target in ("aten::reshape", "aten::expand", "aten::unsqueeze"):
        op = source.owner
        if not isinstance(op, CallOp) or op.target_name != target:
            return value
        source = op.inputs[0]
    return source


def insert_call(before: Operation, name: str, target: str, values, args, result_type, kwargs=()):
    """A new call of `target` on `values`, inserted before `before` (and at its location)."""
    new = call_op_class(target)(target, values, ArgsAttr(tuple(args), tuple(kwargs)), [result_type])
    new.location = before.location
    new.results[0].name_hint = name
    Rewriter.insert_op(new, InsertPoint.before(before))
    return new.results[0]


class _Sharder:
    """Shards one mesh axis. Along a tensor axis weights split (Megatron);
    along a data axis (`data`) the inputs split on their batch dim and
    weights stay whole; the other axis's collectives pass the batch through."""

    def __init__(
        self,
        block,
        axis: str,
        n: int,
        plan: list[tuple[str, str]] = (),
        chosen: dict[Operation, Decision] | None = None,
        axes: tuple[str, ...] = (),
        data: bool = False,
    ):
        self.block, self.axis, self.n = block, axis, n
        self.plan = plan  # (module-path glob, style), first match wins
        self.chosen = chosen or {}  # op -> decision made by the solver
        self.axes = axes or (axis,)  # the mesh's axes, outermost first
        self.data = data
        self.placement: dict[SSAValue, Placement] = {}
        self.params: set[SSAValue] = set()
        self.resharded: dict[tuple[SSAValue, Placement], SSAValue] = {}
        self.replicated_attention: list[str] = []  # where heads did not split n ways
        self.expert_roles: dict[Operation, tuple[str, ExpertMLP]] = {}
        self.expert_ids: dict[int, SSAValue] = {}  # experts -> the ids this rank holds
        self.step = None  # the walk over a training step's state and loss (step.py)
        if block.parent.parent.sym_name.data in (TRAIN_STEP, ACCUMULATE):
            from .step import StepSharding

            self.step = StepSharding(self)

    def style(self, op: CallOp) -> PlanStyle | None:
        return _style(self.plan, op)

    def place(self, value: SSAValue) -> Placement:
        return self.placement.get(value, REPLICATE)

    # ---- resharding ---------------------------------------------------------------

    def reshard(self, value: SSAValue, want: Placement, before: Operation) -> SSAValue:
        have = self.place(value)
        if have == want:
            return value
        key = (value, want)
        if key not in self.resharded:
            self.resharded[key] = self._reshard(value, have, want, before)
        return self.resharded[key]

    _SUFFIX = {
        "AllReduceOp": "reduced",
        "AllGatherOp": "gathered",
        "ReduceScatterOp": "scattered",
        "LocalShardOp": "local",
    }

    def _insert(self, op: Operation, before: Operation, placement: Placement) -> SSAValue:
        op.location = before.location
        Rewriter.insert_op(op, InsertPoint.before(before))
        result = op.results[0]
        source = op.operands[0].name_hint or "value"
        result.name_hint = f"{source}_{self._SUFFIX[type(op).__name__]}"
        self.placement[result] = placement
        return result

    def _full_type(self, value: SSAValue):
        have = self.place(value)
        t = value.type
        if have.kind != "shard":
            return t
        shape = list(t.shape)
        shape[have.dim] = shape[have.dim] * self.n
        return t.with_shape(shape)

    def _reshard(self, value: SSAValue, have: Placement, want: Placement, before) -> SSAValue:
        axis, n = self.axis, self.n
        if self.step is not None and (done := self.step.reshard(value, have, want, before)):
            return done
        if (have.blocks or want.blocks) and value not in self.params:
            raise ShardError(  # the rules never ask for it (see rules.fused_blocks)
                f"{where(before)}: cannot turn a value placed {have} into {want}"
            )
        if want == REPLICATE:
            if have.kind == "partial":
                return self._insert(AllReduceOp(value, axis, have.reduce), before, REPLICATE)
            full = self._full_type(value)
            return self._insert(AllGatherOp(value, full, axis, have.dim), before, REPLICATE)
        if want.kind != "shard":
            raise ShardError(f"{where(before)}: cannot make a value {want}")
        if have.kind == "partial":
            local = local_type(value.type, want, n)
            op = ReduceScatterOp(value, local, axis, want.dim, have.reduce)
            return self._insert(op, before, want)
        if have.kind == "shard":  # another dim: gather, then keep our slice
            value = self.reshard(value, REPLICATE, before)
        if value in self.params:
            return self._sharded_param(value.owner, want)
        local = local_type(value.type, want, n)
        return self._insert(LocalShardOp(value, local, axis, want.dim), before, want)

    def _sharded_param(self, param: ParamOp, want: Placement) -> SSAValue:
        """A copy of the weight that each rank loads only its slice of."""
        local = local_type(param.result.type, want, self.n)
        op = ParamOp(param.weight_name, local, param.kind.data)
        placed = param.attributes.get(PLACEMENTS_ATTR)
        placements = list(placed.data) if placed else [REPLICATE] * len(self.axes)
        placements[self.axes.index(self.axis)] = want
        op.attributes[PLACEMENTS_ATTR] = PlacementsAttr(tuple(placements))
        op.location = param.location
        op.result.name_hint = param.result.name_hint
        Rewriter.insert_op(op, InsertPoint.after(param))
        self.placement[op.result] = want
        return op.result

    # ---- ops --------------------------------------------------------------------

    def run(self) -> None:
        ops = list(self.block.ops)
        if self.data:
            self.split_batch()
        # experts split over `ep` when the mesh has one, else over the tensor axis
        if (self.axis == EXPERT_AXIS or not self.data) and self.step is None:
            self.find_experts(split=self.data or EXPERT_AXIS not in self.axes)
        for op in ops:
            if isinstance(op, ParamOp):
                self.params.add(op.result)
            elif isinstance(op, func.ReturnOp):
                for i, value in enumerate(op.operands):
                    op.operands[i] = self.reshard(value, REPLICATE, op)
            elif isinstance(op, CallOp):
                self.shard_call(op)
            elif isinstance(op, (CollectiveOp, LocalShardOp)):
                if op.axis.data == self.axis:
                    raise ShardError(f"{where(op)}: the program is already sharded")
                self.other_axis(op)
        if self.step is not None:
            self.step.finish()
        for param in [v for v in self.params if not v.uses]:
            Rewriter.erase_op(param.owner)
        if self.replicated_attention:
            warnings.warn(
                f"shard: attention runs replicated at {len(self.replicated_attention)} place(s), "
                f"e.g. {self.replicated_attention[0]}; its inputs are all-gathered first",
                stacklevel=2,
            )

    def split_batch(self) -> None:
        """Each rank of the data axis takes its slice of every input's batch (dim 0)."""
        first = self.block.first_op
        inputs = [a for a in self.block.args if isinstance(a.type, TensorType) and a.type.rank]
        split = [a for a in inputs if divides(a.type.shape[0], self.n, self.block.parent_op())]
        if inputs and not split:
            arg = inputs[0]
            raise ShardError(
                f"mesh axis '{self.axis}' splits the batch (dim 0 of the inputs), but "
                f"'{arg.name_hint}' has dim 0 of {arg.type.shape[0]}, which does not split "
                f"evenly over {self.n} ranks for every size in range; compile with a batch "
                f"that {self.n} divides, or declare it a multiple: "
                f"dynamic_shapes={{'{arg.name_hint}': {{0: {self.n} * Dim('b')}}}}"
            )
        for arg in split:
            local = local_type(arg.type, shard(0), self.n)
            sliced = self._insert(LocalShardOp(arg, local, self.axis, 0), first, shard(0))
            for use in list(arg.uses):
                if use.operation is not sliced.owner:
                    use.operation.operands[use.index] = sliced

    def other_axis(self, op: Operation) -> None:
        """A collective over another mesh axis: a split on another dim passes through."""
        have = self.place(op.operands[0])
        dim = op.dim.value.data if hasattr(op, "dim") else None
        if have.kind != "shard" or have.dim == dim:
            op.operands[0] = self.reshard(op.operands[0], REPLICATE, op)
            return
        local = local_type(op.results[0].type, have, self.n)
        value, axis = op.operands[0], op.axis.data
        if isinstance(op, AllReduceOp):
            new = AllReduceOp(value, axis, op.reduce.data, op.is_async is not None)
        elif isinstance(op, AllGatherOp):
            new = AllGatherOp(value, local, axis, dim, op.is_async is not None)
        elif isinstance(op, ReduceScatterOp):
            new = ReduceScatterOp(value, local, axis, dim, op.reduce.data, op.is_async is not None)
        else:
            new = LocalShardOp(value, local, axis, dim)
        self._replace(op, new, [have])

    def shard_call(self, op: CallOp) -> None:
        if op.target_name in COMPRESSED_LINEARS:
            raise ShardError(
                f"{where(op)}: {op.target_name} is already compressed; put shard before quantize "
                "and sparsify in the pipeline, which then slice the compressed weights per rank"
            )
        if self.step is not None:  # a training step: its own rules (step.py)
            self.step.call(op)
            return
        role, mlp = self.expert_roles.get(op, (None, None))
        if role in ("between", "gather"):  # runs as it is; a gather is replaced by the dispatch
            return
        if role in ("first", "last"):
            self.expert_mm(op, mlp, last=role == "last")
            return
        # a partial sum already reduced for another use arrives replicated: reusing
        # that costs nothing, while carrying the partial on would need a second reduction
        arriving = [self.place(v) for v in op.inputs]
        arriving = [
            REPLICATE if p.kind == "partial" and (v, REPLICATE) in self.resharded else p
            for v, p in zip(op.inputs, arriving)
        ]
        types = [self._full_type(v) for v in op.inputs]  # rules reason on global shapes
        # a plan first
        style = self.style(op) or (PlanStyle.REPLICATE if role == "router" else None)
        decision = self.chosen.get(op) if style is None else None
        if self.data:
            decision = decide_data(op, arriving, types, self.n, self.params)
        elif decision is None:
            decision = decide(op, arriving, types, self.n, self.params, style)
        if role == "view":  # of an expert weight, split by expert
            decision = Decision([shard(0)], [shard(0)])
        if isinstance(op, AttentionOp) and decision.outputs == [REPLICATE]:
            heads = [t.shape[1] for t in types[:3]]  # query, key, value: [batch, heads, ...]
            if any(not divides(h, self.n, op) for h in heads):
                fits = sizes_that_split(*heads, at=op)
                kv_heads = self._full_type(_unrepeated(op.inputs[1])).shape[1]  # key
                self.replicated_attention.append(
                    f"{module_path(op) or where(op)}: {heads[0]} query and {kv_heads} kv heads "
                    f"do not split over {self.n} ranks (sizes that do: "
                    f"{', '.join(map(str, fits)) or 'none'})"
                )
        inputs = [self.reshard(v, p, op) for v, p in zip(op.inputs, decision.inputs)]
        self.emit(op, inputs, decision)

    def emit(self, op: CallOp, inputs: list[SSAValue], decision: Decision) -> None:
        """Replace `op` by its per-rank form, on `inputs` placed as `decision` asks."""
        if decision.parallel is Parallel.VOCAB:
            self.vocab_parallel_lookup(op, inputs)
            return
        if decision.parallel is Parallel.POSITIONS:
            inputs = self.local_positions(op, inputs, decision)
        args = _with_sizes(op, decision) if decision.sizes else op.args
        if decision.parallel is Parallel.BLOCKS:
            args = _local_cuts(op, self.n, decision.inputs[0])
        bias = op.arg("bias") if op.target_name == "aten::linear" else op.arg("self")
        row_with_bias = decision.parallel is Parallel.ROW and op.target_name in (
            "aten::linear",
            "aten::addmm",
        )
        if row_with_bias and isinstance(bias, Operand):
            self.row_parallel_with_bias(op, inputs, bias.index)
            return
        types = [local_type(r.type, p, self.n) for r, p in zip(op.results, decision.outputs)]
        new = type(op)(op.target_name, inputs, args, types, dict(op.attributes))
        self._replace(op, new, decision.outputs)

    def find_experts(self, split: bool) -> None:
        roles, unsplit = expert_roles(self.block, self.n, split, self.data)
        self.expert_roles.update(roles)
        for message in unsplit:
            warnings.warn(f"shard: {message}", stacklevel=3)

    def expert_mm(self, op: CallOp, mlp: ExpertMLP, last: bool) -> None:
        """A grouped product over the experts this rank holds (`plait::expert_mm`):
        rows of other experts are zero, so the last product's results are partial sums.
        With tokens split over the axis, an all-to-all brings each rank the rows
        of its experts first (`plait::expert_dispatch`)."""
        rows, weight, offsets = (
            self.reshard(v, p, op)
            for v, p in zip(grouped_operands(op), (REPLICATE, shard(0), REPLICATE))
        )
        if op is mlp.first and mlp.gather in self.expert_roles:
            tokens = self.reshard(mlp.tokens, shard(0), op)
            token_of_row = self.reshard(mlp.token_of_row, REPLICATE, op)
            args = [*map(Operand, range(3)), Tag("group", self.axis)]
            rows = insert_call(
                op,
                "routed_rows",
                expert_kernel.DISPATCH,
                [tokens, token_of_row, offsets],
                args,
                mlp.gather.results[0].type,
            )
        if mlp.experts not in self.expert_ids:
            self.expert_ids[mlp.experts] = self._indices_here(op, "experts", mlp.experts)
        values = [rows, weight, offsets, self.expert_ids[mlp.experts]]
        target, args = expert_kernel.TARGET, ArgsAttr(tuple(map(Operand, range(4))), ())
        new = call_op_class(target)(target, values, args, [op.results[0].type])
        self._replace(op, new, [partial("sum") if last else REPLICATE])
        if op is mlp.first and mlp.gather in self.expert_roles:
            Rewriter.erase_op(mlp.gather)

    def _indices_here(self, before: CallOp, name: str, size: int) -> SSAValue:
        """This rank's slice of arange(size): which rows (vocabulary, experts) it
        holds, computed in the program so that it stays SPMD."""
        every = insert_call(
            before,
            name,
            "aten::arange",
            [],
            [size],
            TensorType([size], "i64"),
            [("device", Tag("device", "cpu"))],
        )
        local = TensorType([size // self.n], "i64")
        return self._insert(LocalShardOp(every, local, self.axis, 0), before, REPLICATE)

    def held_ids(self, op: CallOp, ids: SSAValue, vocab: int) -> tuple[SSAValue, SSAValue]:
        """Of token `ids` into a table whose V = `vocab` rows split over the
        ranks, this rank holding rows [start, start + V/n): (which ids it
        holds, as i1; the ids as its local rows, 0 for the others). `start`
        is the first of this rank's slice of arange(V), which keeps the
        program SPMD."""
        i64, flags = ids.type, TensorType(ids.type.shape, "i1")
        call = functools.partial(insert_call, op)
        mine = self._indices_here(op, "vocab", vocab)
        first = [Operand(0), 0, 0]
        start = call("vocab_start", "aten::select.int", [mine], first, TensorType([], "i64"))
        local = call("ids_here", "aten::sub.Tensor", [ids, start], [Operand(0), Operand(1)], i64)
        low = call("ids_from", "aten::ge.Scalar", [local], [Operand(0), 0], flags)
        high = call("ids_below", "aten::lt.Scalar", [local], [Operand(0), vocab // self.n], flags)
        inside = call("held", "aten::logical_and", [low, high], [Operand(0), Operand(1)], flags)
        safe = call(
            "ids_held", "aten::where.ScalarOther", [inside, local], [Operand(0), Operand(1), 0], i64
        )
        return inside, safe

    def masked_rows(self, before: CallOp, rows: SSAValue, inside: SSAValue, result_type):
        """`rows` (one per id, features last) times `inside` (i1 per id): zeros
        where this rank does not hold the id."""
        keep_type = TensorType([*inside.type.shape, 1], "i1")
        keep = insert_call(
            before, "held_rows", "aten::unsqueeze", [inside], [Operand(0), -1], keep_type
        )
        return call_op_class("aten::mul.Tensor")(
            "aten::mul.Tensor",
            [rows, keep],
            ArgsAttr((Operand(0), Operand(1)), ()),
            [result_type],
        )

    def vocab_parallel_lookup(self, op: CallOp, inputs: list[SSAValue]) -> None:
        """Megatron's vocab-parallel embedding: this rank looks up the ids among
        its rows and gives zeros for the rest, so the ranks' results sum to
        the lookup."""
        weight, indices = (op.arg(k).index for k in ("weight", "indices"))
        table, ids = inputs[weight], inputs[indices]
        inside, safe = self.held_ids(op, ids, self._full_type(table).shape[0])
        values = [
            table if i == weight else safe if i == indices else v for i, v in enumerate(inputs)
        ]
        rows = insert_call(
            op, "rows", op.target_name, values, op.args.args, op.results[0].type, op.args.kwargs
        )
        masked = self.masked_rows(op, rows, inside, op.results[0].type)
        self._replace(op, masked, [Placement("partial", reduce="sum")])

    def local_positions(self, op: CallOp, inputs: list[SSAValue], decision: Decision):
        """The positions this rank holds of a split dim, as its local rows: the
        split index (a slice of arange(size)) less this rank's first row."""
        at = next(i for i, p in enumerate(decision.inputs[1:], 1) if p.kind == "shard")
        positions = inputs[at]
        size = self._full_type(inputs[0]).shape[decision.inputs[0].dim]
        mine = self._indices_here(op, "rows", size)
        first = [Operand(0), 0, 0]
        start = insert_call(
            op, "row_start", "aten::select.int", [mine], first, TensorType([], "i64")
        )
        args = [Operand(0), Operand(1)]
        local = insert_call(
            op, "local_rows", "aten::sub.Tensor", [positions, start], args, positions.type
        )
        return [local if i == at else v for i, v in enumerate(inputs)]

    def row_parallel_with_bias(self, op: CallOp, inputs: list[SSAValue], bias: int) -> None:
        """x @ W_shard sums partials; the bias is added once, after the all-reduce."""
        if op.target_name == "aten::linear":
            target = "aten::linear"
            values = [v for i, v in enumerate(inputs) if i != bias]
            args = [Operand(0), Operand(1), None]
        else:  # addmm(bias, x, W) -> mm(x, W)
            target = "aten::mm"
            values = [v for i, v in enumerate(inputs) if i != bias]
            args = [Operand(0), Operand(1)]
        result = op.results[0]
        partial_sum = insert_call(op, result.name_hint, target, values, args, result.type)
        self.placement[partial_sum] = Placement("partial", reduce="sum")
        reduced = self.reshard(partial_sum, REPLICATE, op)
        add = call_op_class("aten::add.Tensor")(
            "aten::add.Tensor",
            [reduced, inputs[bias]],
            ArgsAttr((Operand(0), Operand(1)), ()),
            [op.results[0].type],
        )
        self._replace(op, add, [REPLICATE])

    def _replace(self, op: CallOp, new: Operation, placements: list[Placement]) -> None:
        new.location = op.location
        for old, fresh, placement in zip(op.results, new.results, placements):
            fresh.name_hint = old.name_hint
            self.placement[fresh] = placement
        Rewriter.insert_op(new, InsertPoint.before(op))
        for old, fresh in zip(op.results, new.results):
            old.replace_all_uses_with(fresh)
        Rewriter.erase_op(op)


def expert_roles(block, n: int, split: bool, data: bool = False):
    """Each op of the block's expert MLPs -> (its role, the MLP): split by
    expert when `n` divides their count (and `split`: no other axis takes
    them); their routers run replicated. Also why some did not split."""
    roles: dict[Operation, tuple[str, ExpertMLP]] = {}
    unsplit = []
    for mlp in find_expert_mlps(block):
        if mlp.router:
            roles[mlp.router] = ("router", mlp)
        if not split:
            continue
        if not divides(mlp.experts, n, mlp.first):
            unsplit.append(
                f"the {mlp.experts} experts of {module_path(mlp.first) or where(mlp.first)} do "
                f"not split over {n} ranks and run replicated (sizes that do: "
                f"{', '.join(map(str, sizes_that_split(mlp.experts, at=mlp.first))) or 'none'})"
            )
            continue
        for role, ops in [
            ("first", [mlp.first]),
            ("last", [mlp.last]),
            ("between", mlp.between),
            ("view", mlp.views),
            ("gather", [mlp.gather] if data and mlp.gather else []),
        ]:
            roles.update((op, (role, mlp)) for op in ops)
    return roles, unsplit


# what the solver is told each expert role decides (the pass writes it; see _Sharder)
_ROLE_DECISIONS = {
    "first": lambda op: Decision([REPLICATE, shard(0), REPLICATE], [REPLICATE], Parallel.EXPERT),
    "last": lambda op: Decision(
        [REPLICATE, shard(0), REPLICATE], [partial("sum")], Parallel.EXPERT
    ),
    "view": lambda op: Decision([shard(0)], [shard(0)]),
    "between": replicated,
    "router": replicated,
}


def _style(plan: list[tuple[str, PlanStyle]], op: CallOp) -> PlanStyle | None:
    """The manual plan's style for a linear layer (first matching glob), or None."""
    if not isinstance(op, (LinearOp, MatmulOp, EmbeddingOp)):
        return None
    path = module_path(op)
    return next((style for glob, style in plan if fnmatch.fnmatchcase(path, glob)), None)


def _with_sizes(op: CallOp, decision: Decision) -> ArgsAttr:
    """Size arguments of a view/reshape/expand rewritten to local sizes (the
    rules shard only reshapes whose sizes this can rewrite)."""
    name = SIZE_ARGS.get(op.target_name)
    if name is None:
        return op.args
    sizes = op.arg(name)
    local = tuple(
        decision.sizes[i] if i in decision.sizes and size != -1 else size
        for i, size in enumerate(sizes)
    )
    return _with_args(op, **{name: local})


def _with_args(op: CallOp, **values) -> ArgsAttr:
    """The op's arguments with the named ones replaced, where they were given."""
    names = argument_names(op.target_name)
    args, kwargs = list(op.args.args), dict(op.args.kwargs)
    for name, value in values.items():
        position = names.index(name)
        if name in kwargs or position >= len(args):
            kwargs[name] = value
        else:
            args[position] = value
    return ArgsAttr(tuple(args), tuple(kwargs.items()))


def _local_cuts(op: CallOp, n: int, placed: Placement) -> ArgsAttr:
    """A split, chunk or slice of a fused projection's blocks (`placed`), cutting
    this rank's 1/n of each (which lie one after another)."""
    blocks = placed.blocks
    if op.target_name == "aten::slice.Tensor":
        i = block_at(blocks, slice_range(op, placed.dim, sum(blocks))[0])
        start = sum(blocks[:i]) // n
        return _with_args(op, start=start, end=start + blocks[i] // n)
    if op.target_name == "aten::split.Tensor":
        return _with_args(op, split_size=op.arg("split_size") // n)
    if op.target_name == "aten::split_with_sizes":
        return _with_args(op, split_sizes=tuple(s // n for s in op.arg("split_sizes")))
    return op.args  # chunk: the count of pieces stays


class Solver(enum.Enum):
    RULES = "rules"  # Megatron's rules (and a manual plan)
    ILP = "ilp"  # an integer program over the cost model


@dataclass(frozen=True)
class Shard(Pass):
    name = "shard"
    summary = "tensor (Megatron rules or an ILP) and data parallelism, with collectives"

    mesh: Mesh = Mesh((("tp", 2),))
    plan: Plan | None = None  # e.g. *.mlp.down_proj:rowwise,lm_head:replicate
    solve: Solver = Solver.RULES
    hardware: str | None = None  # ilp: the costs' hardware file (default h100-sxm)
    values: SizeValues | None = None  # ilp: sizes to optimize for (default: upper bounds)
    # ilp: weight bytes per device at most (default: no limit); a training step's
    # peak, which picks its ZeRO stage and remat (memory_plan)
    memory: float | None = None
    bucket_mb: float = BUCKET_MB  # a training step's gradients reduced over dp in buckets of this

    def __post_init__(self):
        super().__post_init__()
        axes = self.mesh.as_dict()
        data = [a for a in axes if a in DATA_AXES]
        if len(data) > 1 or len(axes) - len(data) > 1:
            raise OptionError(
                f"'{self.mesh}': give at most one tensor-parallel axis and one data-parallel "
                f"axis ({', '.join(DATA_AXES)}), e.g. tp:8 or dp:2,tp:4",
                "mesh",
            )
        for option in ("hardware", "values", "memory"):
            if self.solve is Solver.RULES and getattr(self, option) is not None:
                raise OptionError(f"{option} is used only by solve=ilp", option)
        if self.memory is not None and self.memory <= 0:
            raise OptionError(f"memory is bytes per device, > 0, not {self.memory:g}", "memory")
        if not self.bucket_mb > 0:
            raise OptionError(
                f"bucket_mb is MiB per gradient bucket, > 0, not {self.bucket_mb:g}", "bucket_mb"
            )
        if self.hardware is not None:
            check_hardware(self.hardware)

    @property
    def _entries(self) -> list[tuple[str, str]]:
        return list(self.plan.entries) if self.plan is not None else []

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if MESH_ATTR in op.attributes:
            raise ShardError("the program is already sharded (it has a plait.mesh)")
        if self.plan is not None:
            paths = [
                module_path(o)
                for b in function_blocks(op)
                for o in b.ops
                if isinstance(o, (LinearOp, MatmulOp, EmbeddingOp))
            ]
            check_all_match(self.plan.globs, paths, "linear or embedding layer", "shard{plan}")
        plan = self._entries
        axes = self.mesh.as_dict()
        data = [a for a in axes if a in DATA_AXES]
        tensor = [a for a in axes if a not in DATA_AXES]
        if tensor and axes[tensor[0]] > 1:  # weights first, on the global batch
            self._shard(op, plan, tuple(axes), tensor[0], axes[tensor[0]])
        if data and axes[data[0]] > 1:
            for block in function_blocks(op):
                sharder = _Sharder(block, data[0], axes[data[0]], axes=tuple(axes), data=True)
                _shard_block(sharder, op)
                bucket_gradients(block, data[0], self.bucket_mb * 2**20)
            _check_alike(op)
        op.attributes[MESH_ATTR] = MeshAttr(tuple(axes.items()))
        if self.solve is Solver.ILP and _is_step(op):
            if self.memory is not None:
                self._plan_memory(op)
            self._price_step(op)

    def _shard(self, op: ModuleOp, plan, axes: tuple[str, ...], axis: str, n: int) -> None:
        blocks = list(function_blocks(op))
        chosen = None
        if self.solve is Solver.ILP and not _is_step(op):
            solution = self._ilp_solution(op, blocks, axis, n, plan)
            chosen = solution.decisions
            op.attributes[SHARDING_ATTR] = StringAttr(
                f"ilp on {self._hardware}: {solution.status}, predicted "
                f"{solution.objective:.6g} s/step, weights {solution.weight_bytes:.6g} "
                f"B/device, {solution.groups} choices for {solution.ops} ops"
            )
        for block in blocks:
            _shard_block(_Sharder(block, axis, n, plan, chosen, axes), op)
        _check_alike(op)

    @property
    def _hardware(self) -> str:
        return self.hardware or "h100-sxm"

    def _plan_memory(self, module: ModuleOp) -> None:
        """A training step within `memory`: the ZeRO stage and remat (memory_plan)."""
        from ...cost.estimate import Target
        from ...hardware import load
        from .memory_plan import plan_memory

        values = self.values or SizeValues()
        target = Target(load(self._hardware), values=values.at(module, "shard"))
        plan_memory(module, target, self.memory, self.bucket_mb, self._hardware, values)

    def _price_step(self, module: ModuleOp) -> None:
        """A training step sharded by its rules: its predicted time and what
        each device holds, by the cost model (see the module's docstring)."""
        from ...cost.estimate import Target, estimate
        from ...hardware import load

        warnings.warn(
            "shard{solve=ilp}: a training step is sharded by the step rules (the integer "
            "program does not model its state's one placement per step yet); plait.sharding "
            "gives the cost model's time for it",
            stacklevel=2,
        )
        values = (self.values or SizeValues()).at(module, "shard")
        step = estimate(module, Target(load(self._hardware), values=values), TRAIN_STEP)
        held = step.schedule.weight_bytes  # parameters, optimizer state, accumulators
        if self.memory is not None and held > self.memory:
            raise SolveError(
                f"memory budget {self.memory:.4g} B per device is below what the training "
                f"step's weights and state need on this mesh, {held:.4g} B; raise memory or "
                "use a larger mesh"
            )
        module.attributes[SHARDING_ATTR] = StringAttr(
            f"step rules on {self._hardware}: predicted {step.schedule.step_time:.6g} s/step "
            "(forward, backward, optimizer and collectives), weights and state "
            f"{held:.6g} B/device"
        )

    def _ilp_solution(self, module: ModuleOp, blocks, axis: str, n: int, plan) -> Solution:
        from ...cost.comm_cost import axis_links
        from ...hardware import load

        # (the ranks of a CPU mesh share its host, as the estimates price them)
        hw = load(self._hardware).shared_by(math.prod(self.mesh.as_dict().values()))
        values = (self.values or SizeValues()).at(module, "shard")
        _, link = axis_links({axis: n}, hw)[axis]
        split = EXPERT_AXIS not in self.mesh.as_dict()
        roles = {op: role for b in blocks for op, (role, _) in expert_roles(b, n, split)[0].items()}
        fixed = {
            op: _ROLE_DECISIONS[role](op)
            for op, role in roles.items()
            if role != "router" or _style(plan, op) is None
        }
        return solve(
            blocks,
            n,
            hw,
            link,
            values,
            self.memory or None,
            style_of=lambda op: _style(plan, op),
            fixed=fixed,
        )


def _is_step(module: ModuleOp) -> bool:
    return any(b.parent.parent.sym_name.data == TRAIN_STEP for b in function_blocks(module))


def _shard_block(sharder: _Sharder, module: ModuleOp) -> None:
    sharder.run()
    if sharder.expert_ids:  # it wrote calls of plait's expert kernels
        require_library(module, expert_kernel.__name__)


def _check_alike(module: ModuleOp) -> None:
    """Functions that share weights or state (@prefill, @decode) must slice them
    alike: each rank holds one copy of its part."""
    seen: dict[str, tuple[str, set]] = {}
    for block in function_blocks(module):
        function = block.parent.parent.sym_name.data
        placements: dict[str, set] = {}
        for param in (o for o in block.ops if isinstance(o, ParamOp)):
            attr = param.attributes.get(PLACEMENTS_ATTR)
            placements.setdefault(param.weight_name, set()).add(str(attr))
        for name, here in placements.items():
            other, there = seen.setdefault(name, (function, here))
            if there != here:
                raise ShardError(
                    f"'{name}' is sharded {sorted(here)} in @{function} but {sorted(there)} in "
                    f"@{other}; functions that share weights or state must shard them alike"
                )
