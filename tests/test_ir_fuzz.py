"""Property-based fuzzing of the IR parser: mutated and truncated IR text is
either accepted or rejected with an error that has a line and a column —
never another exception, never a hang."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plait.ir.errors import IRParseError, IRVerifyError
from plait.ir.text import parse_module, print_module

SEEDS = [
    chunk
    for chunk in (Path(__file__).parent / "ir" / "roundtrip.mlir").read_text().split("// -----\n")
]
TOKENS = [
    "%",
    "%x",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "<",
    ">",
    ",",
    ":",
    "=",
    "->",
    "-",
    "*",
    "+",
    '"',
    "!plait.tensor<",
    "#plait.",
    "sym(",
    "dtype(",
    "loc(",
    "none",
    "inf",
    "nan",
    "0",
    "-1",
    "1.0e-06",
    "9" * 30,
    "floordiv(",
    "max(",
    "\n",
    " ",
    "plait.call",
    "\\",
    "\x00",
    "é",
]


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "delete", "insert", "duplicate", "replace"]))
        if not text:
            break
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 40)))
        if kind == "truncate":
            text = text[:i]
        elif kind == "delete":
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[i:]
        elif kind == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        else:
            text = text[:i] + draw(st.text(max_size=3)) + text[j:]
    return text


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_ir_is_accepted_or_rejected_with_a_position(text):
    try:
        module = parse_module(text, "fuzz.mlir")
    except IRParseError as exc:
        assert exc.line >= 1 and exc.column >= 1
        assert str(exc).startswith(f"fuzz.mlir:{exc.line}:{exc.column}:")
        return
    except IRVerifyError:
        return
    # accepted: it must print and parse back identically
    printed = print_module(module)
    assert print_module(parse_module(printed)) == printed
