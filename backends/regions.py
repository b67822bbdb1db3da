"""`fuse{scope=blocks}`: compile each residual block once and reuse it.

A transformer's program repeats one block per layer. Handing Inductor the
whole program makes Dynamo trace, and Inductor lower and schedule, every
layer; cut at the residual stream, the layers are graphs of the same code
with other weights as inputs, so one compiled graph serves them all (what
PyTorch calls regional compilation).

The cuts are the residual stream's values where the IR's `block_cuts`
puts them: after each run of residual modules that repeats (a layer's
attention and MLP), so the cost model prices the same blocks. What does
not depend on the stream (the embedding, masks, rotary tables, sizes) runs
first, in line, so that the first layer's graph is the others'. What
writes or communicates, and what follows from it, keeps its place in a
block.
"""

from __future__ import annotations

import operator
import types

import torch
import torch.fx

_CALLS = ("call_function", "call_method")
_PURE_MODULES = ("torch", "torch._C._VariableFunctions", "_operator", "operator")


def compile_blocks(
    gm: torch.fx.GraphModule, cuts: list[torch.fx.Node], mode: str
) -> torch.fx.GraphModule | None:
    """A program that runs `gm` as blocks compiled by `torch.compile`, one
    compiled graph per distinct block, cut after each of `cuts` (the first is
    the stream's start); None where `gm` cannot be cut (fewer than two cuts,
    or calls into modules, such as weight prefetching)."""
    nodes = list(gm.graph.nodes)
    if len(cuts) < 2 or any(n.op == "call_module" for n in nodes):
        return None
    in_line, blocks = _cut(nodes, cuts)

    graph, env = torch.fx.Graph(), {}
    for node in nodes:
        if node.op in ("placeholder", "get_attr"):
            env[node] = graph.node_copy(node, env.__getitem__)
    for node in in_line:
        env[node] = graph.node_copy(node, env.__getitem__)
    compiled: dict[str, str] = {}  # a block's code -> the name of its compiled graph
    root = {n.target: getattr(gm, n.target) for n in nodes if n.op == "get_attr"}
    for block in filter(None, blocks):
        inputs, outputs, module = _extract(block)
        code = module.code
        if code not in compiled:
            compiled[code] = f"block_{len(compiled)}"
            root[compiled[code]] = torch.compile(module, mode=mode)
        call = graph.call_module(compiled[code], tuple(env[a] for a in inputs))
        for k, value in enumerate(outputs):
            env[value] = graph.create_node(
                "call_function", operator.getitem, (call, k), name=value.name
            )
    output = next(n for n in nodes if n.op == "output")
    graph.output(torch.fx.map_arg(output.args[0], env.__getitem__))
    return torch.fx.GraphModule(root, graph, class_name="PlaitBlocks")


def _cut(nodes: list[torch.fx.Node], cuts: list[torch.fx.Node]):
    """(in_line, blocks): the calls that run before every block, and the
    blocks, each ending at a cut, then what follows the last one."""
    position, ends = {n: i for i, n in enumerate(nodes)}, set(cuts)
    start = min(cuts, key=position.__getitem__)
    pinned = _pinned(nodes, start)
    calls = [n for n in nodes if n.op in _CALLS]
    in_line = [n for n in calls if position[n] <= position[start] or n not in pinned]
    blocks, block = [], []
    for node in calls:
        if position[node] > position[start] and node in pinned:
            block.append(node)
            if node in ends:
                blocks.append(block)
                block = []
    return in_line, [*blocks, block]


def _extract(block: list[torch.fx.Node]):
    """(inputs, outputs, module): the block as a graph of its own whose
    names depend only on its code, so that equal blocks print equal."""
    inside = set(block)
    inputs = list(dict.fromkeys(a for n in block for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in block if any(u not in inside for u in n.users)]
    graph = torch.fx.Graph()
    local = {a: graph.placeholder(f"in_{k}") for k, a in enumerate(inputs)}
    for j, node in enumerate(block):
        args = torch.fx.map_arg(node.args, local.__getitem__)
        kwargs = torch.fx.map_arg(node.kwargs, local.__getitem__)
        local[node] = graph.create_node(node.op, node.target, args, kwargs, name=f"v{j}")
    graph.output(tuple(local[v] for v in outputs))
    return inputs, outputs, torch.fx.GraphModule(torch.nn.Module(), graph, class_name="Block")


def _pinned(nodes: list[torch.fx.Node], start: torch.fx.Node) -> set[torch.fx.Node]:
    """Calls that must keep their place among the blocks: the stream's start
    and what depends on it; what writes, communicates or has effects we do
    not know; what reads a value something writes; and what follows."""
    written = {a for n in nodes if n.op in _CALLS and not _pure(n) for a in n.all_input_nodes}
    pinned: set[torch.fx.Node] = set()
    for node in nodes:
        if node.op not in _CALLS:
            continue
        reads = node.all_input_nodes
        if (
            node is start
            or not _pure(node)
            or any(a in pinned or a is start or a in written for a in reads)
        ):
            pinned.add(node)
    return pinned


def _pure(node: torch.fx.Node) -> bool:
    """A call that only computes its results (no write, no collective)."""
    target = node.target
    if node.op == "call_method":
        return not target.endswith("_")
    if isinstance(target, torch._ops.OpOverload):
        return not target._schema.is_mutable and target.namespace not in (
            "_c10d_functional",
            "c10d",
        )
    if isinstance(target, (types.BuiltinFunctionType, types.FunctionType)):
        module = getattr(target, "__module__", None) or ""
        return module in _PURE_MODULES and not target.__name__.endswith("_")
    return False
