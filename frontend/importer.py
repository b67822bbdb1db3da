"""ExportedProgram -> plait IR module and WeightStore.

Each ATen call becomes the typed op of its family (`ir.targets`), or a
`plait.call`; its arguments are kept as export recorded them. Parameters,
buffers and constants become `plait.param` ops named by their state-dict keys,
with their data in the WeightStore. Each op's location is the module path that
called it (`nn_module_stack`), such as "model.layers.3.mlp.down_proj".

Symbolic ints (`sym_size`, arithmetic on sizes) do not become ops: they are
expressions over the input's size symbols, written into the arguments and
types that use them. In-place ATen calls on fresh tensors are replaced by
their out-of-place forms so that the IR is purely functional; the one
exception is program state: a buffer the model updates in place (a KV cache
written with `index_copy_`) becomes a `plait.param state`, and its updates
stay in-place calls whose results every later read uses, so the order of
writes and reads is the dataflow's.
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
from collections.abc import Collection

import torch
from torch.export.graph_signature import InputKind
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp, NameLoc, NoneAttr, StringAttr
from xdsl.ir import Block, Region, SSAValue

from ..ir import args as irargs
from ..ir.attrs import SYMBOLS_ATTR, SymbolsAttr
from ..ir.dtypes import IR_NAMES
from ..ir.errors import PlaitError
from ..ir.libraries import require_library
from ..ir.names import value_name
from ..ir.ops import ParamOp, call_op_class
from ..ir.targets import join_name
from ..ir.types import TensorType
from ..ir.weights import WeightStore
from .capture import Captured
from .symbols import SymbolMap

# checks on symbolic sizes that export already proved for the declared ranges;
# their SymBool arguments have no form in the IR
_DROPPED = {
    "aten::_assert_scalar",
    "aten::sym_constrain_range_for_size",
    "aten::sym_constrain_range",
}


class GraphImportError(PlaitError):
    """A captured graph that plait cannot represent."""


def defining_module(target) -> str | None:
    """The Python module that registered a custom operator (torch.library)."""
    from torch._library.custom_ops import OPDEFS

    qualname = f"{target.namespace}::{target._schema.name.split('::', 1)[1]}"
    definition = OPDEFS.get(qualname)
    module = getattr(getattr(definition, "_init_fn", None), "__module__", None)
    return module if module and module.split(".")[0] == target.namespace else None


def target_name(target) -> str:
    """torch OpOverload -> schema name ('aten::add.Tensor')."""
    namespace = target.namespace
    name = target._schema.name.split("::", 1)[1]
    return join_name(namespace, name, target._overloadname)


def location(path: str) -> NameLoc:
    return NameLoc(StringAttr(path), NoneAttr())


def _module_path(node: torch.fx.Node, prefix: str) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if path.startswith("_empty_nn_module_stack"):
        return ""
    path = path.split("@")[0]
    return _strip(path, prefix)


def _strip(name: str, prefix: str) -> str:
    """Drop a wrapper's prefix: "model.lm_head" -> "lm_head", "model" -> ""."""
    if prefix and name == prefix.rstrip("."):
        return ""
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def _mutates_self(node: torch.fx.Node) -> bool:
    """An in-place op: writes its first argument and returns it."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    arguments = node.target._schema.arguments
    first = arguments[0] if arguments else None
    return bool(first is not None and first.alias_info is not None and first.alias_info.is_write)


# higher-order ops (torch.ops.higher_order.*): the construct a user wrote, and what to do
_HIGHER_ORDER: dict[str, tuple[str, str]] = {
    "cond": ("torch.cond", "compute both branches and select with torch.where"),
    "while_loop": ("while_loop", "unroll the loop in Python with a static trip count"),
    "map_impl": ("control_flow.map", "loop over the leading dim in Python"),
    "scan": ("scan", "unroll the scan in Python with a static length"),
    "associative_scan": ("associative_scan", "use cumsum/cumprod or unroll it"),
    "invoke_subgraph": ("a nested compiled region", "call the submodule directly"),
}
_HIGHER_ORDER_DEFAULT = "rewrite this part of the model without it"

# `File "model.py", line 12, in forward\n    code` in fx's node.meta["stack_trace"]
_FRAME = re.compile(
    r'File "(?P<file>[^"]+)", line (?P<line>\d+), in [^\n]*\n[ \t]*(?P<code>[^\n]*)'
)


def source_line(node: torch.fx.Node) -> str:
    """The user's file:line (and code) that made a node, from its stack trace:
    the innermost frame outside torch and generated code; or ""."""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    frames = [
        m
        for m in _FRAME.finditer(node.meta.get("stack_trace") or "")
        if not m["file"].startswith(("<", torch_dir))
    ]
    if not frames:
        return ""
    frame = frames[-1]
    return f"{frame['file']}:{frame['line']}: {frame['code'].strip()}"


def dtype_name(dtype: torch.dtype) -> str:
    return IR_NAMES[str(dtype).removeprefix("torch.")]


class _Importer:
    def __init__(self, captured: Captured, initial_state: Collection[str] = ()):
        self.captured = captured
        # parameters and buffers (export's names) that are program state starting
        # from the model's values (training: trained parameters, running statistics)
        self.initial_state = frozenset(initial_state)
        self.program = captured.program
        self.prefix = captured.prefix
        self.symbols = SymbolMap()
        self.values: dict[torch.fx.Node, SSAValue | list[SSAValue]] = {}
        self.weights = WeightStore()
        self.block = Block()
        # tensors updated in place: node -> value after the last mutation
        self.mutated: dict[torch.fx.Node, SSAValue] = {}
        # result of an in-place op -> the tensor it aliases
        self.bases: dict[torch.fx.Node, torch.fx.Node] = {}
        # modules that define the custom operators the program calls
        self.libraries: set[str] = set()
        # buffers the program updates in place: program state
        self.state: set[torch.fx.Node] = set()

    # ---- types and values ------------------------------------------------

    def where(self, node: torch.fx.Node) -> str:
        path = _module_path(node, self.prefix)
        return f"{path} ({node.name})" if path else node.name

    def dim(self, value, node) -> int | object:
        if isinstance(value, int):
            return value
        if isinstance(value, torch.SymInt):
            expr = value.node.expr
            converted = self.symbols.convert(expr, self.where(node))
            return int(converted) if converted.is_Integer else converted
        raise GraphImportError(f"{self.where(node)}: unexpected size {value!r}")

    def tensor_type(self, fake, node) -> TensorType:
        if not isinstance(fake, torch.Tensor):
            raise GraphImportError(
                f"{self.where(node)}: produces {type(fake).__name__}, not a tensor; "
                "plait programs pass only tensors between ops"
            )
        return TensorType([self.dim(d, node) for d in fake.shape], dtype_name(fake.dtype))

    def bind_input_symbols(self, user_inputs: list[torch.fx.Node]) -> None:
        ranges = self.program.range_constraints
        for index, node in enumerate(user_inputs):
            names = self.captured.dim_names[index] if index < len(self.captured.dim_names) else {}
            fake = node.meta.get("val")
            if not isinstance(fake, torch.Tensor):
                continue
            for d, size in enumerate(fake.shape):
                # a dim is a symbol, or a formula in one (a derived dim such as 2*k)
                free = size.node.expr.free_symbols if isinstance(size, torch.SymInt) else ()
                if len(free) == 1:
                    (symbol,) = free
                    self.symbols.bind(symbol, names.get(d), ranges.get(symbol))

    def lookup(self, node: torch.fx.Node):
        """The IR value of a node, after any in-place update of it."""
        node = self.bases.get(node, node)
        return self.mutated[node] if node in self.mutated else self.values.get(node)

    # ---- arguments -------------------------------------------------------

    def convert_arg(self, value, node, operands: list[SSAValue]):
        if isinstance(value, torch.fx.Node):
            fake = value.meta.get("val")
            if isinstance(fake, (torch.SymInt, int)) and not isinstance(fake, bool):
                dim = self.dim(fake, node)
                return dim if isinstance(dim, int) else irargs.Sym(dim)
            if isinstance(fake, (torch.SymFloat, torch.SymBool)):
                raise GraphImportError(
                    f"{self.where(node)}: symbolic {type(fake).__name__} arguments are not "
                    "supported; make the value static"
                )
            ssa = self.lookup(value)
            if not isinstance(ssa, SSAValue):
                raise GraphImportError(f"{self.where(node)}: argument {value.name} is not a tensor")
            operands.append(ssa)
            return irargs.Operand(len(operands) - 1)
        if isinstance(value, (list, tuple)):
            return tuple(self.convert_arg(v, node, operands) for v in value)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.dtype):
            return irargs.Tag("dtype", dtype_name(value))
        if isinstance(value, torch.device):
            return irargs.Tag("device", str(value))
        if isinstance(value, torch.layout):
            return irargs.Tag("layout", str(value).removeprefix("torch."))
        if isinstance(value, torch.memory_format):
            return irargs.Tag("memory_format", str(value).removeprefix("torch."))
        raise GraphImportError(
            f"{self.where(node)}: argument of type {type(value).__name__} is not supported"
        )

    # ---- nodes -----------------------------------------------------------

    def import_param(self, node: torch.fx.Node, spec) -> None:
        name = spec.target
        if spec.kind == InputKind.PARAMETER:
            tensor, kind = self.program.state_dict[name], "parameter"
        elif spec.kind == InputKind.BUFFER:
            source = self.program.state_dict if spec.persistent else self.program.constants
            tensor, kind = source[name], "buffer"
        else:
            tensor, kind = self.program.constants[name], "constant"
        if isinstance(tensor, torch.nn.Parameter):
            tensor = tensor.data
        plait_name = _strip(name, self.prefix)
        initialized = name in self.initial_state
        if node in self.state or initialized:
            kind = "state"
            if not initialized and not tensor.is_meta and bool(tensor.any()):
                raise GraphImportError(
                    f"buffer '{name}' is updated in place, so it is program state, which "
                    "starts zero-filled on every rank; initialize it with zeros in the model"
                )
        op = ParamOp(plait_name, self.tensor_type(node.meta["val"], node), kind)
        owner = plait_name.rpartition(".")[0]
        if owner:
            op.location = location(owner)
        op.result.name_hint = value_name(plait_name)  # nn.Sequential's "0.weight" too
        if kind != "state" or initialized:
            self.weights.add(plait_name, tensor)
        self.block.add_op(op)
        self.values[node] = op.result

    def import_call(self, node: torch.fx.Node) -> None:
        target = node.target
        if target is operator.getitem:
            source, index = node.args
            results = self.values.get(source)
            if not isinstance(results, list):
                raise GraphImportError(f"{self.where(node)}: getitem on a non-tuple value")
            self.values[node] = results[index]
            return
        if isinstance(target, torch._ops.HigherOrderOperator):
            self.reject_higher_order(node)
        if not isinstance(target, torch._ops.OpOverload):
            fake = node.meta.get("val")
            if isinstance(fake, (torch.SymInt, int)):
                return  # size arithmetic: folded into the expressions that use it
            raise GraphImportError(
                f"{self.where(node)}: cannot import a call to {getattr(target, '__name__', target)}; "
                "plait supports ATen and custom operators (torch.library). Rewrite this part "
                "of the model without it"
            )
        name = target_name(target)
        if name in _DROPPED:
            return
        if target.namespace not in ("aten", "prims"):
            module = defining_module(target)
            if module is not None:
                self.libraries.add(module)
        fake = node.meta.get("val")
        if isinstance(fake, (torch.SymInt, int)) and not isinstance(fake, bool):
            return  # aten.sym_size and friends: symbolic, not data
        name, self_node, functional = self.functionalize(node, name)
        operands: list[SSAValue] = []
        args = tuple(self.convert_arg(a, node, operands) for a in node.args)
        kwargs = tuple((k, self.convert_arg(v, node, operands)) for k, v in node.kwargs.items())
        if fake is None:
            result_types, multi = [], False
        elif isinstance(fake, (list, tuple)):
            result_types, multi = [self.tensor_type(f, node) for f in fake], True
        else:
            result_types, multi = [self.tensor_type(fake, node)], False
        path = _module_path(node, self.prefix)
        promoted = self._promoted_type(node, functional, result_types) if functional else None
        op = call_op_class(name)(
            name, operands, irargs.ArgsAttr(args, kwargs), [promoted] if promoted else result_types
        )
        self._add(op, path, node.name)
        if promoted is not None:
            # in place, the result is cast back to the updated tensor's dtype
            dtype = irargs.Tag("dtype", result_types[0].dtype)
            cast = call_op_class("aten::_to_copy")(
                "aten::_to_copy",
                [op.results[0]],
                irargs.ArgsAttr((irargs.Operand(0),), (("dtype", dtype),)),
                result_types,
            )
            self._add(cast, path, node.name)
            op = cast
        self.values[node] = list(op.results) if multi else (op.results[0] if op.results else [])
        if self_node is not None:
            self.mutated[self_node] = op.results[0]

    def reject_higher_order(self, node: torch.fx.Node) -> None:
        name = node.target.name()
        construct, fix = _HIGHER_ORDER.get(name, (name, _HIGHER_ORDER_DEFAULT))
        source = source_line(node)
        raise GraphImportError(
            f"{self.where(node)}: {construct} (torch.ops.higher_order.{name}: control flow or "
            "a subgraph) is not supported; plait programs are straight-line operator graphs. "
            + (f"It is called at {source}. " if source else "")
            + f"To compile the model, {fix}"
        )

    def _add(self, op, path: str, name: str) -> None:
        if path:
            op.location = location(path)
        for result in op.results:
            result.name_hint = name
        self.block.add_op(op)

    def _promoted_type(self, node: torch.fx.Node, overload, types: list[TensorType]):
        """The out-of-place op's result type, if type promotion makes it differ
        from the in-place op's (which keeps the updated tensor's dtype)."""
        from torch._guards import detect_fake_mode
        from torch.utils import _pytree as pytree

        def fake(value):
            return value.meta.get("val") if isinstance(value, torch.fx.Node) else value

        args, kwargs = pytree.tree_map(fake, (tuple(node.args), dict(node.kwargs)))
        mode = detect_fake_mode(pytree.tree_leaves((args, kwargs)))
        with mode or contextlib.nullcontext():
            out = overload(*args, **kwargs)
        if dtype_name(out.dtype) == types[0].dtype:
            return None
        return TensorType(types[0].shape, dtype_name(out.dtype))

    def functionalize(self, node: torch.fx.Node, name: str):
        """In-place call on a fresh tensor -> its out-of-place form.

        Returns the target to call, the mutated node (whose later uses, and
        those of every earlier in-place result aliasing it, must see the new
        value) and the out-of-place overload; the last two are None for calls
        that mutate nothing.
        """
        schema = node.target._schema
        if not _mutates_self(node):
            if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
                raise GraphImportError(
                    f"{self.where(node)}: {name} mutates an argument; not supported"
                )
            return name, None, None
        namespace, base_name = node.target.namespace, schema.name.split("::", 1)[1]
        packet = getattr(getattr(torch.ops, namespace), base_name.rstrip("_"), None)
        overload = getattr(packet, node.target._overloadname, None) if packet is not None else None
        arg = node.args[0]
        base = self.bases.get(arg, arg)
        if base in self.state:  # an update of program state stays in place
            current = self.lookup(base)
            if current.uses:
                raise GraphImportError(
                    f"{self.where(node)}: state buffer '{base.name}' is read before this "
                    f"in-place update ({name}); plait orders state updates before reads. "
                    "Update the buffer first, then read it"
                )
            self.bases[node] = base
            return name, base, None
        if overload is None or not self._is_fresh(base):
            raise GraphImportError(
                f"{self.where(node)}: in-place {name} on a tensor that is an input, a weight or "
                "a view cannot be imported; use the out-of-place form in the model"
            )
        self.bases[node] = base
        return target_name(overload), base, overload

    def _is_fresh(self, base: torch.fx.Node) -> bool:
        """A computed tensor that no view aliases: mutating it in place is local."""
        if base.op != "call_function":
            return False
        if isinstance(base.target, torch._ops.OpOverload):
            if any(r.alias_info is not None for r in base.target._schema.returns):
                return False
        elif base.target is operator.getitem:
            producer = base.args[0]  # split, chunk, unbind return views of their input
            if isinstance(producer.target, torch._ops.OpOverload) and any(
                r.alias_info is not None for r in producer.target._schema.returns
            ):
                return False
        else:
            return False
        group = [base] + [n for n, b in self.bases.items() if b is base]
        for member in group:
            for user in member.users:
                if isinstance(user.target, torch._ops.OpOverload) and not _mutates_self(user):
                    if any(r.alias_info is not None for r in user.target._schema.returns):
                        return False
        return True

    # ---- program ---------------------------------------------------------

    def run(self) -> tuple[ModuleOp, WeightStore]:
        signature = self.program.graph_signature
        specs = {spec.arg.name: spec for spec in signature.input_specs}
        graph = self.program.graph_module.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self.state = _updated_buffers(graph, specs)
        user_inputs = [n for n in placeholders if specs[n.name].kind == InputKind.USER_INPUT]
        self.bind_input_symbols(user_inputs)
        input_types = []
        for node in user_inputs:
            input_types.append(self.tensor_type(node.meta["val"], node))
        self.block = Block(arg_types=input_types)
        for arg, node in zip(self.block.args, user_inputs):
            arg.name_hint = node.name
            self.values[node] = arg
        outputs: list[SSAValue] = []
        for node in graph.nodes:
            if node.op == "placeholder":
                spec = specs[node.name]
                if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                    self.import_param(node, spec)
                elif spec.kind != InputKind.USER_INPUT:
                    raise GraphImportError(
                        f"{node.name}: inputs of kind {spec.kind.name} are not supported"
                    )
            elif node.op == "call_function":
                self.import_call(node)
            elif node.op == "output":
                for position, out in enumerate(node.args[0]):
                    value = self.lookup(out)
                    if not isinstance(value, SSAValue):
                        node_value = out.meta.get("val") if hasattr(out, "meta") else out
                        shown = getattr(out, "name", None) or repr(out)
                        raise GraphImportError(
                            f"output {position} of the model is {shown} "
                            f"({type(node_value).__name__}), not a tensor; plait programs "
                            "return tensors only"
                        )
                    outputs.append(value)
            else:
                for user in node.users:  # a subgraph, e.g. a torch.cond branch
                    if isinstance(user.target, torch._ops.HigherOrderOperator):
                        self.reject_higher_order(user)
                source = source_line(node)
                raise GraphImportError(
                    f"{self.where(node)}: graph node kind '{node.op}' (e.g. control flow or "
                    "a submodule call) is not supported yet"
                    + (f"; it comes from {source}" if source else "")
                )
        self.block.add_op(func.ReturnOp(*outputs))
        fn = func.FuncOp(
            "forward",
            (input_types, [v.type for v in outputs]),
            Region(self.block),
        )
        module = ModuleOp([fn])
        require_library(module, *self.libraries)
        if self.symbols.ranges:
            module.attributes[SYMBOLS_ATTR] = SymbolsAttr(
                tuple((n, lo, hi) for n, (lo, hi) in self.symbols.ranges.items())
            )
        return module, self.weights


def _updated_buffers(graph: torch.fx.Graph, specs) -> set[torch.fx.Node]:
    """Buffers that an in-place call writes (through earlier in-place results too)."""
    bases: dict[torch.fx.Node, torch.fx.Node] = {}
    updated = set()
    for node in graph.nodes:
        if node.op == "call_function" and _mutates_self(node):
            arg = node.args[0]
            base = bases.get(arg, arg)
            bases[node] = base
            spec = specs.get(base.name) if base.op == "placeholder" else None
            if spec is not None and spec.kind == InputKind.BUFFER:
                updated.add(base)
    return updated


def import_program(
    captured: Captured, initial_state: Collection[str] = ()
) -> tuple[ModuleOp, WeightStore]:
    """The plait IR module and weights of a captured program; `initial_state`
    names parameters and buffers that become program state whose initial
    values (the model's) are in the WeightStore."""
    return _Importer(captured, initial_state).run()
