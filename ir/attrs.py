"""plait attributes: size-symbol ranges, device meshes, placements, and the
schemes later passes attach (quantization, sparsity, memory placement).

    #plait.symbols<batch = [1, 64], seq = [2, 4096]>
    #plait.mesh<dp = 2, tp = 4>
    #plait.placements<[shard(0), replicate, partial(sum)]>
    #plait.quant<method = "easyquant", bits = 4, group = 128, outlier_sigma = 3.0>
    #plait.sparsity<method = "gqsa", group = 16, sparsity = 0.5, bits = 4>
    #plait.mem<tier = "device", offset = 4096>

The last three are records: a fixed schema of typed fields, written as
`key = value` pairs, declared as data (`FIELDS`) by each class.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from xdsl.ir import Data
from xdsl.irdl import irdl_attr_definition

from .args import float_text, parse_optional_text, string_literal
from .errors import PlaitError

INF = None  # an unbounded symbol range is stored as None and printed `inf`

# names under which passes attach these attributes
SYMBOLS_ATTR = "plait.symbols"  # module: size symbols and their ranges
MESH_ATTR = "plait.mesh"  # module: the device mesh a sharded plan runs on
PLACEMENTS_ATTR = "plait.placements"  # param: the slice of the weight each rank loads
ARENA_ATTR = "plait.arena"  # module: bytes of the planned activation arena (see memplan)
SHARDING_ATTR = "plait.sharding"  # module: how the shard solver chose (status, objective)
TIERING_ATTR = "plait.tiering"  # module: what tier streams and its predicted step times
REMAT_ATTR = "plait.remat"  # module: what remat recomputes, its budget and predicted cost
MEMORY_PLAN_ATTR = "plait.memory_plan"  # module: the ZeRO stage and remat chosen for a budget
MESH_PLAN_ATTR = "plait.mesh_plan"  # module: the dp x tp x pp mesh parallelize chose, and why
FUSE_ATTR = "plait.fuse"  # module: its programs are compiled through Inductor, in this mode
FUSE_SCOPE_ATTR = "plait.fuse_scope"  # module: "blocks" compiles each repeated block once
LIBRARIES_ATTR = "plait.libraries"  # module: Python modules that define custom ops
PIPELINE_ATTR = "plait.pipeline"  # module: its stages' cut and schedule (see passes.shard.stages)
STAGE_ATTR = "plait.stage"  # state param: the one pipeline stage that holds it
PIPELINE_AXIS = "pp"  # the mesh axis of pipeline stages

REDUCE_OPS = ("sum", "avg", "max", "min", "product")


def _check_unique(names: list[str], what: str, parser, pos) -> None:
    seen = set()
    for name in names:
        if name in seen:
            parser.raise_error(f"{what} '{name}' is declared twice", pos, parser.pos)
        seen.add(name)


def _parse_bound(parser) -> int | None:
    if parser.parse_optional_keyword("inf") is not None:
        return INF
    return parser.parse_integer(allow_boolean=False)


def _bound_text(value: int | None) -> str:
    return "inf" if value is None else str(value)


@irdl_attr_definition
class SymbolsAttr(Data[tuple[tuple[str, int, int | None], ...]]):
    """The size symbols of a program with their inclusive value ranges."""

    name = "plait.symbols"

    @property
    def ranges(self) -> dict[str, tuple[int, int | None]]:
        return {name: (lo, hi) for name, lo, hi in self.data}

    @classmethod
    def parse_parameter(cls, parser) -> tuple[tuple[str, int, int | None], ...]:
        def entry() -> tuple[str, int, int | None]:
            name = parser.parse_identifier(context_msg=" (a size symbol)")
            parser.parse_punctuation("=")
            parser.parse_punctuation("[")
            lo = parser.parse_integer(allow_boolean=False)
            parser.parse_punctuation(",")
            hi = _parse_bound(parser)
            parser.parse_punctuation("]")
            return name, lo, hi

        pos = parser.pos
        entries = parser.parse_comma_separated_list(parser.Delimiter.ANGLE, entry)
        _check_unique([e[0] for e in entries], "size symbol", parser, pos)
        for name, lo, hi in entries:
            if lo < 0 or (hi is not None and hi < lo):
                parser.raise_error(
                    f"size symbol '{name}' has an empty range [{lo}, {hi}]", pos, parser.pos
                )
        return tuple(entries)

    def print_parameter(self, printer) -> None:
        body = ", ".join(f"{n} = [{lo}, {_bound_text(hi)}]" for n, lo, hi in self.data)
        printer.print_string(f"<{body}>")


@irdl_attr_definition
class MeshAttr(Data[tuple[tuple[str, int], ...]]):
    """A device mesh: named axes with their sizes, outermost first."""

    name = "plait.mesh"

    @property
    def axes(self) -> dict[str, int]:
        return dict(self.data)

    @property
    def size(self) -> int:
        out = 1
        for _, n in self.data:
            out *= n
        return out

    @classmethod
    def parse_parameter(cls, parser) -> tuple[tuple[str, int], ...]:
        def axis() -> tuple[str, int]:
            name = parser.parse_identifier(context_msg=" (a mesh axis name)")
            parser.parse_punctuation("=")
            pos = parser.pos
            size = parser.parse_integer(allow_boolean=False, allow_negative=False)
            if size < 1:
                parser.raise_error(
                    f"mesh axis '{name}' must have at least 1 device", pos, parser.pos
                )
            return name, size

        pos = parser.pos
        axes = parser.parse_comma_separated_list(parser.Delimiter.ANGLE, axis)
        _check_unique([a[0] for a in axes], "mesh axis", parser, pos)
        return tuple(axes)

    def print_parameter(self, printer) -> None:
        printer.print_string("<" + ", ".join(f"{n} = {s}" for n, s in self.data) + ">")


def mesh_axes(module) -> dict[str, int]:
    """The mesh a module was sharded for, axis -> size ({} for one device)."""
    mesh = module.attributes.get(MESH_ATTR)
    return mesh.axes if mesh is not None else {}


def mesh_from_text(text: str) -> dict[str, int]:
    """'tp:8' or 'dp:2,tp:4' -> {"dp": 2, "tp": 4} (outermost axis first)."""
    axes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition(":")
        if not name.isidentifier() or not size.isdigit() or int(size) < 1 or name in axes:
            raise PlaitError(
                f"bad mesh '{text}': write axes as NAME:SIZE separated by commas, e.g. tp:8 or dp:2,tp:4"
            )
        axes[name] = int(size)
    return axes


@dataclass(frozen=True)
class Placement:
    """How a tensor lies along one mesh axis, in DTensor's vocabulary."""

    kind: str  # "shard" | "replicate" | "partial" | "flat"
    dim: int | None = None  # for shard
    reduce: str | None = None  # for partial: "sum", "max", ...
    # for shard: the dim holds these blocks one after another (a fused projection's
    # q, k and v), each split over the ranks; a rank holds its piece of every block
    blocks: tuple[int, ...] | None = None
    # for flat (ZeRO's layout): the tensor of this shape (as the other axes leave
    # it), flattened and zero-padded to a multiple of the ranks; a rank holds its
    # contiguous piece, ceil(numel / ranks) elements
    shape: tuple[int, ...] | None = None

    def __str__(self) -> str:
        if self.kind == "flat":
            return f"flat([{', '.join(map(str, self.shape))}])"
        if self.kind == "shard" and self.blocks:
            return f"shard({self.dim}, blocks = [{', '.join(map(str, self.blocks))}])"
        if self.kind == "shard":
            return f"shard({self.dim})"
        if self.kind == "partial":
            return f"partial({self.reduce})"
        return "replicate"

    def ranges(self, size: int, parts: int, index: int) -> list[tuple[int, int]]:
        """(start, length) along `dim` of the pieces rank `index` of `parts`
        holds, in the order it holds them."""
        starts, offset = [], 0
        for block in self.blocks or (size,):
            piece = block // parts
            starts.append((offset + index * piece, piece))
            offset += block
        return starts


REPLICATE = Placement("replicate")


def shard(dim: int, blocks: tuple[int, ...] | None = None) -> Placement:
    return Placement("shard", dim=dim, blocks=tuple(blocks) if blocks else None)


def partial(reduce: str = "sum") -> Placement:
    return Placement("partial", reduce=reduce)


def flat(shape) -> Placement:
    return Placement("flat", shape=tuple(shape))


@irdl_attr_definition
class PlacementsAttr(Data[tuple[Placement, ...]]):
    """One placement per mesh axis."""

    name = "plait.placements"

    @classmethod
    def parse_parameter(cls, parser) -> tuple[Placement, ...]:
        def placement() -> Placement:
            kind = parser.parse_keyword_in(
                ("shard", "replicate", "partial", "flat"), " (a placement)"
            )
            if kind == "shard":
                parser.parse_punctuation("(")
                dim = parser.parse_integer(allow_boolean=False)
                blocks = None
                if parser.parse_optional_punctuation(","):
                    parser.parse_keyword("blocks")
                    parser.parse_punctuation("=")
                    blocks = parser.parse_comma_separated_list(
                        parser.Delimiter.SQUARE, lambda: parser.parse_integer(allow_boolean=False)
                    )
                parser.parse_punctuation(")")
                return shard(dim, blocks)
            if kind == "partial":
                parser.parse_punctuation("(")
                reduce = parser.parse_keyword_in(REDUCE_OPS, " (a reduction)")
                parser.parse_punctuation(")")
                return partial(reduce)
            if kind == "flat":
                parser.parse_punctuation("(")
                shape = parser.parse_comma_separated_list(
                    parser.Delimiter.SQUARE, lambda: parser.parse_integer(allow_boolean=False)
                )
                parser.parse_punctuation(")")
                return flat(shape)
            return REPLICATE

        with parser.in_angle_brackets():
            items = parser.parse_comma_separated_list(parser.Delimiter.SQUARE, placement)
        return tuple(items)

    def print_parameter(self, printer) -> None:
        printer.print_string("<[" + ", ".join(str(p) for p in self.data) + "]>")


# ---- records: typed key = value fields declared as data --------------------

_FIELD_PARSERS = {
    int: lambda p: p.parse_integer(allow_boolean=False),
    float: lambda p: float(p.parse_number()),
    bool: lambda p: p.parse_boolean(),
    str: lambda p: p.expect(lambda: parse_optional_text(p), "expected a string literal"),
}


def _field_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return string_literal(value)
    if isinstance(value, float):
        return float_text(value)
    return str(value)


class RecordAttr(Data[tuple[tuple[str, object], ...]]):
    """Base of attributes written `<key = value, ...>` with a fixed schema.

    Subclasses list `FIELDS`: (key, python type, default). Fields equal to their
    default are not printed, so adding a field keeps old text valid.
    """

    FIELDS: ClassVar[tuple[tuple[str, type, object], ...]] = ()

    @classmethod
    def make(cls, **values: object):
        schema = {k: (t, d) for k, t, d in cls.FIELDS}
        for key in values:
            if key not in schema:
                raise KeyError(f"{cls.name} has no field '{key}'; fields: {', '.join(schema)}")
        return cls(tuple((k, values.get(k, d)) for k, _, d in cls.FIELDS))

    def __getitem__(self, key: str) -> object:
        return dict(self.data)[key]

    @classmethod
    def parse_parameter(cls, parser):
        schema = {k: (t, d) for k, t, d in cls.FIELDS}
        values: dict[str, object] = {}

        def entry() -> None:
            pos = parser.pos
            key = parser.parse_identifier()
            if key not in schema:
                parser.raise_error(
                    f"{cls.name} has no field '{key}'; fields: {', '.join(schema)}", pos, parser.pos
                )
            parser.parse_punctuation("=")
            values[key] = _FIELD_PARSERS[schema[key][0]](parser)

        parser.parse_comma_separated_list(parser.Delimiter.ANGLE, entry)
        return tuple((k, values.get(k, d)) for k, _, d in cls.FIELDS)

    def print_parameter(self, printer) -> None:
        defaults = {k: d for k, _, d in self.FIELDS}
        shown = [f"{k} = {_field_text(v)}" for k, v in self.data if v != defaults[k]]
        printer.print_string("<" + ", ".join(shown) + ">")


@irdl_attr_definition
class QuantAttr(RecordAttr):
    """A weight quantization scheme chosen by a quantization pass."""

    name = "plait.quant"
    FIELDS = (
        ("method", str, "rtn"),
        ("bits", int, 8),
        ("group", int, 0),  # 0: one scale per output channel
        ("symmetric", bool, True),
        ("outlier_sigma", float, 0.0),  # 0: no outliers kept
        ("outliers", float, 0.0),  # fraction of the weights kept in full precision
        ("error", float, 0.0),  # relative reconstruction error ||Q(W) - W|| / ||W||
    )


@irdl_attr_definition
class SparsityAttr(RecordAttr):
    """A structured sparsity pattern chosen by a sparsity pass."""

    name = "plait.sparsity"
    FIELDS = (
        ("method", str, "gqsa"),
        ("group", int, 16),
        ("sparsity", float, 0.5),
        ("bits", int, 4),
        ("pattern", str, ""),  # e.g. "2:4"
        ("error", float, 0.0),  # relative reconstruction error ||S(W) - W|| / ||W||
    )


class MemorySpace(enum.Enum):
    """The memory tiers a tensor may live in (MemAttr's `tier`)."""

    DEVICE = "device"  # the accelerator's memory (on CPU: RAM)
    HOST = "host"  # host memory, streamed to the device (on CPU: the weights file)


@irdl_attr_definition
class MemAttr(RecordAttr):
    """Where a tensor lives: memory tier and its offset in that tier's arena
    (readers and writers: plait.ir.memory)."""

    name = "plait.mem"
    FIELDS = (
        ("tier", str, MemorySpace.DEVICE.value),
        ("offset", int, -1),  # -1: not planned
        ("prefetch", bool, False),
    )
