"""Textual pass pipelines.

    canonicalize,cse,shard{mesh=tp:2}
    quantize{bits=4,group=128},memplan{budget=40GB}

A pipeline is passes separated by commas; each may take `{key=value,...}`
options, which set the pass's dataclass fields (`outlier-sigma` sets
`outlier_sigma`). A value may itself hold commas (`mesh=dp:2,tp:2`): a piece
without `=` continues the previous value.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing

from ..ir.errors import PlaitError
from . import registry
from .base import Pass
from .options import OptionError


class PipelineError(PlaitError):
    def __init__(self, message: str, text: str, column: int):
        self.column = column
        super().__init__(f"pipeline:{column + 1}: error: {message}\n  {text}\n  {' ' * column}^")


def _split_top(text: str, start: int = 0) -> list[tuple[str, int]]:
    """Split on commas outside braces, keeping each piece's offset."""
    pieces, depth, begin = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PipelineError("unbalanced '}'", text, start + i)
        elif ch == "," and depth == 0:
            pieces.append((text[begin:i], start + begin))
            begin = i + 1
    if depth != 0:
        raise PipelineError("unclosed '{'", text, start + len(text))
    pieces.append((text[begin:], start + begin))
    return pieces


def _convert(value: str, annotation, field_name: str, full: str, column: int):
    kinds = (
        typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    )
    if value == "" and type(None) in kinds and not any(hasattr(k, "parse") for k in kinds):
        return None
    option = field_name.replace("_", "-")
    for kind in kinds:
        try:
            if kind is bool:
                if value.lower() in ("true", "1", "yes", ""):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                continue
            if isinstance(kind, type) and issubclass(kind, enum.Enum):
                choices = [str(m.value) for m in kind]
                if value not in choices:
                    raise PipelineError(
                        f"option '{option}' is one of {', '.join(choices)}, not '{value}'",
                        full,
                        column,
                    )
                return kind(value)
            if hasattr(kind, "parse"):  # a typed option (passes/options.py)
                return kind.parse(value)
            if kind in (int, float, str):
                return kind(value)
        except OptionError as exc:
            raise PipelineError(f"option '{option}': {exc}", full, column) from None
        except ValueError:
            continue
    names = " or ".join(getattr(k, "__name__", str(k)) for k in kinds)
    raise PipelineError(f"option '{option}' expects {names}, got '{value}'", full, column)


def parse_pipeline(text: str) -> list[Pass]:
    """Pipeline text -> pass instances, with errors pointing at the column."""
    passes: list[Pass] = []
    if not text.strip():
        return passes
    for piece, offset in _split_top(text):
        stripped = piece.strip()
        lead = offset + len(piece) - len(piece.lstrip())
        if not stripped:
            raise PipelineError("empty pass name", text, lead)
        name, brace, rest = stripped.partition("{")
        name = name.strip()
        try:
            cls = registry.get(name)
        except registry.UnknownPassError as exc:
            raise PipelineError(str(exc), text, lead) from None
        options: dict[str, tuple[str, int]] = {}
        if brace:
            if not rest.endswith("}"):
                raise PipelineError(
                    "expected '}' at the end of the options", text, lead + len(stripped)
                )
            body_start = lead + len(name) + 1
            last = None
            for item, item_offset in _split_top(rest[:-1], body_start):
                if "=" in item:
                    key, _, value = item.partition("=")
                    last = key.strip().replace("-", "_")
                    options[last] = (value.strip(), item_offset)
                elif last is not None:
                    value, column = options[last]
                    options[last] = (f"{value},{item.strip()}", column)
                elif item.strip():
                    last = item.strip().replace("-", "_")
                    options[last] = ("", item_offset)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, (value, column) in options.items():
            if key not in fields:
                known = ", ".join(k.replace("_", "-") for k in fields) or "none"
                raise PipelineError(
                    f"pass '{name}' has no option '{key.replace('_', '-')}' (options: {known})",
                    text,
                    column,
                )
            kwargs[key] = _convert(value, hints[key], key, text, column)
        try:
            passes.append(cls(**kwargs))
        except OptionError as exc:  # a check across options, at the option it names
            column = options[exc.option][1] if exc.option in options else lead
            raise PipelineError(f"pass '{name}': {exc}", text, column) from None
        except (TypeError, ValueError) as exc:
            raise PipelineError(f"pass '{name}': {exc}", text, lead) from None
    return passes


def with_prerequisites(passes: list[Pass]) -> list[tuple[Pass, str | None]]:
    """The passes, each preceded by those it `requires` that did not run before
    it: (pass, the name of the pass that needed it, or None if asked for)."""
    out: list[tuple[Pass, str | None]] = []
    for p in passes:
        ran = {q.name for q, _ in out}
        out += [(registry.get(n)(), p.name) for n in p.requires if n not in ran]
        out.append((p, None))
    return out


def pipeline_text(passes: list[Pass]) -> str:
    """The text that parses back to `passes` (options at their defaults are left out)."""
    out = []
    for p in passes:
        opts = [
            f"{f.name.replace('_', '-')}={option_text(getattr(p, f.name))}"
            for f in dataclasses.fields(p)
            if getattr(p, f.name) != f.default
        ]
        out.append(p.name + ("{" + ",".join(opts) + "}" if opts else ""))
    return ",".join(out)


def option_text(value) -> str:
    """An option's value as pipeline text."""
    if isinstance(value, enum.Enum):
        return str(value.value)
    return "" if value is None else str(value)
