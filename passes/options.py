"""Typed pass options, parsed and checked when the pipeline text is parsed.

A pass declares its options as dataclass fields; a field whose type is one of
these classes is parsed from its text by `parse` (so `shard{mesh=tp:0}` fails
at `plait compile`'s first line, with the option's column, not after
torch.export). Each prints back as the text it was parsed from.

    Mesh.parse("dp:2,tp:4")              -> axes (("dp", 2), ("tp", 4))
    SizeValues.parse("batch:1,seq:2048") -> sizes for named size symbols
    Globs.parse("model.layers.*,lm_head") -> module-path patterns
"""

from __future__ import annotations

import enum
import fnmatch
import re
from dataclasses import dataclass
from typing import ClassVar

from xdsl.dialects.builtin import ModuleOp

from ..ir.attrs import SYMBOLS_ATTR
from ..ir.errors import PlaitError


class OptionError(ValueError):
    """A bad option value; `option` names the field when a check spans several."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


def check_hardware(name: str) -> None:
    """The `hardware` option names a hardware file plait has (else an OptionError)."""
    from ..hardware import load
    from ..ir.errors import PlaitError

    try:
        load(name)
    except PlaitError as exc:
        raise OptionError(str(exc), "hardware") from None


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@dataclass(frozen=True)
class Mesh:
    """Named mesh axes and their sizes, outermost first: `dp:2,tp:4`."""

    axes: tuple[tuple[str, int], ...]

    @classmethod
    def parse(cls, text: str) -> Mesh:
        axes: dict[str, int] = {}
        for item in _items(text):
            name, _, size = item.partition(":")
            name = name.strip()
            if not name.isidentifier() or not size.strip().isdigit() or int(size) < 1:
                raise OptionError(f"'{item}' is not NAME:SIZE with SIZE >= 1 (e.g. tp:8)")
            if name in axes:
                raise OptionError(f"axis '{name}' appears twice")
            axes[name] = int(size)
        if not axes:
            raise OptionError("give at least one axis, e.g. tp:2 or dp:2,tp:4")
        return cls(tuple(axes.items()))

    def as_dict(self) -> dict[str, int]:
        return dict(self.axes)

    def __str__(self) -> str:
        return ",".join(f"{name}:{size}" for name, size in self.axes)


@dataclass(frozen=True)
class SizeValues:
    """Sizes of named size symbols to plan or optimize for: `batch:1,seq:2048`.
    Symbols not named take their upper bound (`at`)."""

    sizes: tuple[tuple[str, int], ...] = ()

    @classmethod
    def parse(cls, text: str) -> SizeValues:
        sizes: dict[str, int] = {}
        for item in _items(text):
            name, _, value = item.partition(":")
            if not name.strip().isidentifier() or not value.strip().isdigit():
                raise OptionError(f"'{item}' is not NAME:INT (e.g. seq:2048)")
            sizes[name.strip()] = int(value)
        return cls(tuple(sizes.items()))

    def at(self, module: ModuleOp, pass_name: str) -> dict[str, int]:
        """Every size symbol of `module`: the named ones, the rest at their upper bounds."""
        symbols = module.attributes.get(SYMBOLS_ATTR)
        ranges = symbols.ranges if symbols is not None else {}
        given = dict(self.sizes)
        for name, value in given.items():
            if name not in ranges:
                known = ", ".join(ranges) or "none (the program has static shapes)"
                raise PlaitError(
                    f"{pass_name}{{values=...}} names size symbol '{name}', which the program "
                    f"does not have; its symbols: {known}"
                )
            low, high = ranges[name]
            if value < low or (high is not None and value > high):
                raise PlaitError(
                    f"{pass_name}{{values={name}:{value}}} is outside the range the program "
                    f"was compiled for, [{low}, {high if high is not None else 'inf'}]"
                )
        for name, (_, high) in ranges.items():
            if name not in given:
                if high is None:
                    raise PlaitError(
                        f"size symbol '{name}' has no upper bound; give "
                        f"{pass_name}{{values={name}:N}} for the largest size to plan for"
                    )
                given[name] = high
        return given

    def __str__(self) -> str:
        return ",".join(f"{name}:{value}" for name, value in self.sizes)


@dataclass(frozen=True)
class Globs:
    """Module-path patterns (fnmatch), comma-separated: `model.layers.*,lm_head`."""

    patterns: tuple[str, ...] = ("*",)
    _VALID: ClassVar[re.Pattern] = re.compile(r"^[\w.*?\[\]!-]+$")

    @classmethod
    def parse(cls, text: str) -> Globs:
        patterns = tuple(_items(text))
        if not patterns:
            raise OptionError("give at least one module-path pattern, e.g. model.layers.*")
        for pattern in patterns:
            if not cls._VALID.match(pattern):
                raise OptionError(f"'{pattern}' is not a module-path pattern (e.g. *.mlp.*)")
        return cls(patterns)

    def match(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, p) for p in self.patterns)

    def unmatched(self, paths) -> list[str]:
        """The patterns that match none of `paths`."""
        paths = list(paths)
        return [p for p in self.patterns if not any(fnmatch.fnmatchcase(x, p) for x in paths)]

    def __str__(self) -> str:
        return ",".join(self.patterns)


def check_all_match(globs: Globs, paths, what: str, where: str) -> None:
    """Every pattern must select something: a pattern that matches nothing is a typo."""
    paths = sorted(set(paths))
    missing = globs.unmatched(paths)
    if missing:
        shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
        raise PlaitError(
            f"{where}: '{missing[0]}' matches no {what}; the {what}s here are: {shown or 'none'}"
        )


class PlanStyle(enum.Enum):
    """A manual plan's choice for a linear or embedding layer (PyTorch's words)."""

    COLWISE = "colwise"
    ROWWISE = "rowwise"
    REPLICATE = "replicate"


@dataclass(frozen=True)
class Plan:
    """A manual sharding plan, first match wins: `*.mlp.down_proj:rowwise,lm_head:replicate`."""

    entries: tuple[tuple[str, PlanStyle], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Plan:
        styles = [s.value for s in PlanStyle]
        entries = []
        for item in _items(text):
            glob, _, style = item.rpartition(":")
            if not glob or style not in styles:
                raise OptionError(
                    f"plan entry '{item}': write MODULE-GLOB:STYLE with STYLE one of "
                    f"{', '.join(styles)} (e.g. *.mlp.down_proj:rowwise)"
                )
            entries.append((glob, PlanStyle(style)))
        if not entries:
            raise OptionError("give at least one MODULE-GLOB:STYLE entry")
        return cls(tuple(entries))

    @property
    def globs(self) -> Globs:
        return Globs(tuple(glob for glob, _ in self.entries))

    def __str__(self) -> str:
        return ",".join(f"{glob}:{style.value}" for glob, style in self.entries)
