"""The `plait` dialect: every type, attribute and op of plait's IR."""

from xdsl.context import Context
from xdsl.dialects.builtin import Builtin
from xdsl.dialects.func import Func
from xdsl.ir import Dialect

from .args import ArgsAttr
from .attrs import MemAttr, MeshAttr, PlacementsAttr, QuantAttr, SparsityAttr, SymbolsAttr
from .ops import CALL_OPS, COLLECTIVE_OPS, LocalShardOp, ParamOp, RecvOp, SendOp, WaitOp
from .types import AsyncType, TensorType

Plait = Dialect(
    "plait",
    [ParamOp, *CALL_OPS.values(), *COLLECTIVE_OPS, WaitOp, LocalShardOp, SendOp, RecvOp],
    [
        TensorType,
        AsyncType,
        ArgsAttr,
        SymbolsAttr,
        MeshAttr,
        PlacementsAttr,
        QuantAttr,
        SparsityAttr,
        MemAttr,
    ],
)


def make_context() -> Context:
    """An xDSL context that knows builtin, func and plait."""
    ctx = Context()
    ctx.load_dialect(Builtin)
    ctx.load_dialect(Func)
    ctx.load_dialect(Plait)
    return ctx
