"""pipeline{stages=S} on generation programs (`plait.compile_generation`):
@prefill and @decode cut into S stages at the same residual boundaries.

The cut is the one that balances the stages' estimated prefill + decode
time (`stages.best_cuts`, each symbol at its largest size). Every op belongs
to one stage by dataflow, as in a training step's forward: an op to the
first stage whose boundary value it computes; a KV cache (program state) to
the stage of its layer; weights, buffers and ops that read only inputs,
weights and constants (masks, rotary tables) go to every stage that reads
them (a tied embedding is held by the first and the last stage). Each stage
k gets `@prefill_stage<k>` and `@decode_stage<k>`, which take the whole
program's inputs and run on rank k of a new mesh axis `pp:S`:

    stage 0:  embeddings, layers 0..i    send the residual stream to stage 1
    stage 1:  recv it, layers i+1..       logits, sent back to every other stage

Every rank's decoding loop so picks the same next token (and knows when
all sequences end). The stages before the last receive the logits in a
function of their own, `@prefill_logits_stage<k>()`, so that they can start
the next group of sequences first. With `microbatches=M` the programs are captured
for batch / M sequences (`plait.compile_generation` does it) and the cache
holds M such groups (`plait.sequence_groups`): while the last stage runs
group g, the first runs group g + 1, and messages of group g carry tags
shifted by g, as a training step's micro-batches do. A received value's
size may be a symbol of the inputs (the prompt's length): the receiver
computes it from its own inputs.
"""

from __future__ import annotations

import re

from xdsl.dialects import func
from xdsl.dialects.builtin import IntegerAttr, ModuleOp, i64
from xdsl.ir import Block, Operation, Region, SSAValue

from ...ir.attrs import MESH_ATTR, PIPELINE_AXIS, STAGE_ATTR, SYMBOLS_ATTR, MeshAttr, mesh_axes
from ...ir.ops import ParamOp, RecvOp, SendOp
from ...ir.residual import residual_chain
from ...ir.text import where
from .stage_split import StageError, boundary_segments, closure, free_ops

GENERATION = ("prefill", "decode")
GROUPS_ATTR = "plait.sequence_groups"  # module: the KV cache's groups of sequences (microbatches)
_STAGE_SUFFIX = re.compile(r"^(.*)_stage(\d+)$")


def stage_function_name(function: str, stage: int) -> str:
    """The function of a generation program that stage `stage` runs."""
    return f"{function}_stage{stage}"


def logits_function_name(function: str, stage: int) -> str:
    """The function where stage `stage` (not the last) receives `function`'s logits."""
    return f"{function}_logits_stage{stage}"


def sequence_groups(module: ModuleOp) -> int:
    """The groups of sequences the programs run one after another (1 unless pipelined)."""
    attr = module.attributes.get(GROUPS_ATTR)
    return attr.value.data if attr is not None else 1


def split_name(name: str) -> tuple[str, int | None]:
    """'decode_stage1' -> ('decode', 1); 'decode' -> ('decode', None)."""
    match = _STAGE_SUFFIX.match(name)
    return (match.group(1), int(match.group(2))) if match else (name, None)


def is_generation(module: ModuleOp) -> bool:
    """@prefill and @decode, or their stages' functions."""
    names = {split_name(f.sym_name.data)[0] for f in module.ops if isinstance(f, func.FuncOp)}
    return set(GENERATION) <= names


def pipeline_generation(
    module: ModuleOp, stages: int, microbatches: int, virtual: int, hardware: str
) -> None:
    """Replace @prefill and @decode by their S stage functions (see above)."""
    from ...cost.estimate import Target, estimate
    from ...hardware import load
    from .stages import best_cuts

    if virtual > 1:
        raise StageError(
            f"pipeline{{virtual={virtual}}}: generation runs one stage per rank (virtual=1); "
            "microbatches=M keeps the stages busy with M groups of sequences"
        )
    if PIPELINE_AXIS in mesh_axes(module):
        raise StageError(f"the programs are already pipelined (mesh axis '{PIPELINE_AXIS}')")
    functions = {f.sym_name.data: f for f in module.ops if isinstance(f, func.FuncOp)}
    extra = sorted(set(functions) - set(GENERATION))
    if extra:
        raise StageError(f"pipeline cuts @prefill and @decode, but the module also has @{extra[0]}")
    symbols = module.attributes.get(SYMBOLS_ATTR)
    largest = {n: hi for n, (lo, hi) in symbols.ranges.items()} if symbols else {}
    target = Target(load(hardware), values=largest)
    splits = {name: GenerationSplit(functions[name]) for name in GENERATION}
    lengths = {name: len(s.chain) for name, s in splits.items()}
    if len(set(lengths.values())) != 1:
        raise StageError(
            f"@prefill has {lengths['prefill']} residual boundaries and @decode "
            f"{lengths['decode']}; pipeline cuts both at the same ones"
        )
    costs = [0.0] * (lengths["decode"] + 1)
    for name, split in splits.items():
        times = {row.op: row.time for row in estimate(module, target, name).ops}
        costs = [a + b for a, b in zip(costs, split.segment_costs(times))]
    if len(costs) < stages:
        raise StageError(
            f"pipeline{{stages={stages}}}: the programs have {len(costs) - 1} residual "
            f"boundaries, so at most {len(costs)} stages; use stages <= {len(costs)}"
        )
    cuts = best_cuts(costs, stages)
    built, tag = [], 0
    for name in GENERATION:
        functions[name].detach()
        stage_functions, tag = splits[name].build(name, cuts, stages, tag)
        built += stage_functions
    for fn in built:
        module.body.blocks.first.add_op(fn)
    axes = {**mesh_axes(module), PIPELINE_AXIS: stages}
    module.attributes[MESH_ATTR] = MeshAttr(tuple(axes.items()))
    module.attributes[GROUPS_ATTR] = IntegerAttr(microbatches, i64)


class GenerationSplit:
    """A generation program's ops by segment, the stretch between two residual
    boundaries (the last one ends at the logits)."""

    def __init__(self, fn: func.FuncOp):
        self.fn = fn
        self.block = fn.body.blocks.first
        outputs = list(self.block.last_op.operands)
        if len(outputs) != 1:
            raise StageError(f"@{fn.sym_name.data} returns {len(outputs)} values, not the logits")
        self.output = outputs[0]
        self.ops = list(self.block.ops)[:-1]
        self.chain = residual_chain(self.block)
        self.free = free_ops(self.ops)
        self.segment = self._segments([m.result for m in self.chain] + [self.output])

    def _segments(self, boundaries: list[SSAValue]) -> dict[Operation, int]:
        segment = boundary_segments(boundaries, self.free)
        for op in self.ops:  # ops no boundary reads (in-place writes): after their operands
            if op not in segment and op not in self.free:
                found = [segment[v.owner] for v in op.operands if v.owner in segment]
                segment[op] = max(found, default=len(boundaries) - 1)
        return segment

    def segment_costs(self, times: dict[Operation, float]) -> list[float]:
        costs = [0.0] * (len(self.chain) + 1)
        for op, j in self.segment.items():
            costs[j] += times.get(op, 0.0)
        return costs

    def build(self, name: str, cuts: list[int], stages: int, tag: int):
        """Each stage's function; the next free message tag."""
        stage_of_segment = [sum(1 for c in cuts[1:] if c <= j) for j in range(len(self.chain) + 1)]
        stage = {op: stage_of_segment[j] for op, j in self.segment.items()}
        self._check_state(stage)
        needs: list[set[Operation]] = [
            # (each stage computes the free ops and reads the weights it needs)
            closure([op for op in self.ops if stage.get(op) == s], self.free.__contains__)
            for s in range(stages)
        ]
        position = {op: i for i, op in enumerate(self.ops)}
        recvs: list[list[tuple[SSAValue, int, int]]] = [[] for _ in range(stages)]
        sends: list[dict[SSAValue, list[tuple[int, int]]]] = [{} for _ in range(stages)]
        for s in range(stages):
            wanted = {
                v for op in needs[s] for v in op.operands
                if isinstance(v.owner, Operation) and v.owner not in needs[s]
            }  # fmt: skip
            for v in sorted(wanted, key=lambda v: position[v.owner]):
                sender = stage[v.owner]
                if sender >= s:  # (dataflow runs forward: a bug in the segments)
                    raise StageError(f"{where(v.owner)}: stage {s} reads a value of stage {sender}")
                sends[sender].setdefault(v, []).append((s, tag))
                recvs[s].append((v, sender, tag))
                tag += 1
        last = stages - 1
        back = {s: tag + s for s in range(last)}  # the logits, to every other stage
        built = []
        for s in range(stages):
            block = Block(arg_types=[a.type for a in self.block.args])
            mapping: dict[SSAValue, SSAValue] = {}
            for new, old in zip(block.args, self.block.args):
                new.name_hint = old.name_hint
                mapping[old] = new
            for value, peer, t in recvs[s]:
                recv = RecvOp(value.type, PIPELINE_AXIS, peer, t)
                recv.results[0].name_hint = value.name_hint
                block.add_op(recv)
                mapping[value] = recv.results[0]
            for op in self.ops:
                if op not in needs[s]:
                    continue
                block.add_op(op.clone(value_mapper=mapping))
                for result in op.results:
                    for peer, t in sends[s].get(result, []):
                        block.add_op(SendOp(mapping[result], PIPELINE_AXIS, peer, t))
            outputs = []
            if s == last:
                outputs.append(mapping[self.output])
                for peer, t in back.items():
                    block.add_op(SendOp(outputs[0], PIPELINE_AXIS, peer, t))
            block.add_op(func.ReturnOp(*outputs))
            types = ([a.type for a in block.args], [v.type for v in outputs])
            built.append(func.FuncOp(stage_function_name(name, s), types, Region(block)))
        for s, t in back.items():  # the logits, received when the runtime asks for them
            recv = RecvOp(self.output.type, PIPELINE_AXIS, last, t)
            recv.results[0].name_hint = "logits"
            block = Block([recv, func.ReturnOp(recv.results[0])])
            types = ([], [self.output.type])
            built.append(func.FuncOp(logits_function_name(name, s), types, Region(block)))
        return built, tag + last

    def _check_state(self, stage: dict[Operation, int]) -> None:
        """A KV cache lives on one stage: the one of its layer."""
        for op in self.ops:
            if not (isinstance(op, ParamOp) and op.is_state):
                continue
            readers = {stage[u.operation] for u in op.result.uses if u.operation in stage}
            if len(readers) > 1:
                first, second = sorted(readers)[:2]
                raise StageError(
                    f"{where(op)}: state '{op.weight_name}' is read on pipeline stages {first} "
                    f"and {second}; pipeline keeps each state on one stage"
                )
            op.attributes[STAGE_ATTR] = IntegerAttr(stage[op], i64)
