"""Fuzzing the IR reader: mutated IR text or bytes are accepted or rejected
with an error that has a line and a column — never another exception, never
a hang — and what is accepted is type-correct: the program built from it
computes, op by op, the types the IR declares.

CI runs a few hundred cases. The full run (2,000 byte-level and 2,000
token-level mutations of llama-tiny's IR, unsharded and tp:2-sharded) prints
its counts; it takes 3-12 minutes on 2 cores:

    PYTHONPATH=... python tests/test_ir_fuzz.py --cases 2000
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import random
import re
import sys
import time
import traceback
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plait.ir.errors import IRParseError, IRVerifyError, PlaitError
from plait.ir.text import decode_ir_text, parse_module, print_module

SEEDS = [
    chunk
    for chunk in (Path(__file__).parent / "ir" / "roundtrip.mlir").read_text().split("// -----\n")
]
for _seed in SEEDS:  # loads torch's meta kernels, which the verifier uses, before any deadline
    parse_module(_seed)
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


# ---- mutations of a real model's IR ------------------------------------------------

FILENAME = "fuzz.mlir"
# string literals, SSA names, words, numbers, the arrow, then any other character
_TOKEN = re.compile(
    r'"(?:[^"\\\n]|\\.)*"|%[\w.$-]+|[A-Za-z_][\w.$]*|\d+(?:\.\d+)?(?:e[-+]?\d+)?|->|\s+|.'
)


def _token_classes(tokens: list[str]) -> list[str]:
    """Each token's class: replacing a token by another of its class keeps the
    text well-formed more often than not (a dim by another dim, f32 by f16, a
    use of %a by a use of %b), so the verifier sees it."""
    from plait.ir.dtypes import TORCH_NAMES

    classes = []
    for i, token in enumerate(tokens):
        after = "".join(tokens[i + 1 : i + 3]).lstrip()
        if token[0] == '"':
            classes.append("string")
        elif token[0] == "%":
            classes.append("definition" if after.startswith(("=", ":")) else "use")
        elif token in TORCH_NAMES:
            classes.append("dtype")
        elif token[0].isalpha() or token[0] == "_":
            classes.append("word")
        elif token[0].isdigit():
            classes.append("number")
        else:
            classes.append("space" if token.isspace() else "punct")
    return classes


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """1-3 byte-level edits: flip a bit, set a byte, delete, insert, duplicate, truncate."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        if not out:
            break
        i = rng.randrange(len(out))
        j = min(len(out), i + rng.randint(1, 16))
        kind = rng.choice(["flip", "set", "delete", "insert", "duplicate", "truncate"])
        if kind == "flip":
            out[i] ^= 1 << rng.randrange(8)
        elif kind == "set":
            out[i] = rng.randrange(256)
        elif kind == "delete":
            del out[i:j]
        elif kind == "insert":
            out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif kind == "duplicate":
            out[j:j] = out[i:j]
        else:
            del out[i:]
    return bytes(out)


def mutate_tokens(text: str, rng: random.Random) -> str:
    """1-2 token-level edits: a token replaced by another of its class from the
    text, a number off by one, a token deleted, duplicated or swapped."""
    tokens = _TOKEN.findall(text)
    classes = _token_classes(tokens)
    members = collections.defaultdict(list)
    for token, cls in zip(tokens, classes):
        members[cls].append(token)
    for _ in range(rng.randint(1, 2)):
        kind = rng.choice(["same-class", "same-class", "number", "delete", "duplicate", "swap"])
        wanted = (
            ("number",)
            if kind == "number"
            else ("use", "dtype", "word", "number", "string", "punct", "definition")
        )
        i = rng.choice([i for i, c in enumerate(classes) if c in wanted])
        if kind == "same-class":
            tokens[i] = rng.choice(members[classes[i]])
        elif kind == "number":
            whole, dot, rest = tokens[i].partition(".")
            tokens[i] = str(max(0, int(whole) + rng.choice([-1, 1, 2, -2]))) + dot + rest
        elif kind == "delete":
            tokens[i] = ""
        elif kind == "duplicate":
            tokens[i] = tokens[i] + " " + tokens[i]
        else:
            j = rng.choice([j for j, c in enumerate(classes) if c != "space"])
            tokens[i], tokens[j] = tokens[j], tokens[i]
    return "".join(tokens)


def llama_seeds(compiled_ir: str) -> list[str]:
    """llama-tiny's IR after canonicalize,cse,dce, and sharded tp:2."""
    from plait.passes.manager import PassManager

    sharded = PassManager.parse("shard{mesh=tp:2}").run(parse_module(compiled_ir))
    return [compiled_ir, print_module(sharded)]


# ---- running what is accepted ---------------------------------------------------------


def _run_values(module) -> dict[str, int]:
    """Small sizes for the size symbols, unlike the verifier's (multiples of 8)."""
    from plait.ir.attrs import SYMBOLS_ATTR

    symbols = module.attributes.get(SYMBOLS_ATTR)
    values: dict[str, int] = {}
    for name, lo, hi in symbols.data if symbols is not None else ():
        top = hi if hi is not None else lo + 16
        free = [v for v in (5, 3, 7, 6, 2, 9) if lo <= v <= top and v not in values.values()]
        values[name] = free[0] if free else lo
    return values


def _random(sizes: list[int], dtype: str) -> torch.Tensor:
    from plait.backends.fx import torch_dtype

    t = torch_dtype(dtype)
    if t.is_floating_point:
        return torch.randn(sizes, dtype=t) * 0.1
    if t == torch.bool:
        return torch.rand(sizes) < 0.5
    return torch.randint(0, 2, sizes, dtype=t)


def _random_weights(module, values: dict[str, int]):
    """Random weights of the declared types (whole: a sharded param's dims times
    the mesh axis sizes it is split over)."""
    from plait.ir import symbolic
    from plait.ir.attrs import MESH_ATTR, PLACEMENTS_ATTR
    from plait.ir.ops import ParamOp
    from plait.ir.weights import WeightStore

    mesh = module.attributes.get(MESH_ATTR)
    sizes_of_axes = list(mesh.axes.values()) if mesh is not None else []
    weights = WeightStore()
    for op in module.walk():
        if not isinstance(op, ParamOp) or op.is_state or op.weight_name in weights.names():
            continue
        sizes = [symbolic.evaluate(d, values) for d in op.result.type.shape]
        placements = op.attributes.get(PLACEMENTS_ATTR)
        for n, placement in zip(sizes_of_axes, placements.data if placements else ()):
            if placement.kind == "shard" and placement.dim < len(sizes):
                sizes[placement.dim] *= n
        weights.add(op.weight_name, _random(sizes, op.result.type.dtype))
    return weights


@contextlib.contextmanager
def _fake_groups(module):
    """Process groups of a fake backend in this process (collectives do nothing
    but give results of the right shapes), or None for an unsharded module;
    the group is destroyed after, so later tests see no process group."""
    import torch.distributed as dist
    from plait.backends.fx import CollectiveGroups, mesh_coords
    from plait.ir.attrs import MESH_ATTR
    from torch.testing._internal.distributed.fake_pg import FakeStore

    mesh = module.attributes.get(MESH_ATTR)
    if mesh is None:
        yield None
        return
    dist.init_process_group(
        "fake", store=FakeStore(), rank=0, world_size=math.prod(mesh.axes.values())
    )
    try:
        name = dist.group.WORLD.group_name
        axes = mesh.axes
        yield CollectiveGroups({a: name for a in axes}, dict(axes), mesh_coords(axes, 0))
    finally:
        dist.destroy_process_group()


def computed_type_mismatch(module) -> str | None:
    """Build the module's program on random weights, run it on small random
    inputs, and say where a call's or the function's result differs from its
    declared shape or dtype (None if none does)."""
    from plait.backends.fx import OP_META, build_program
    from plait.ir import symbolic
    from plait.ir.dtypes import IR_NAMES
    from plait.ir.ops import CallOp
    from plait.ir.text import where
    from xdsl.dialects import func

    values = _run_values(module)

    def declared(type_) -> tuple:
        return tuple(symbolic.evaluate(d, values) for d in type_.shape), type_.dtype

    def actual(t: torch.Tensor) -> tuple:
        return tuple(t.shape), IR_NAMES[str(t.dtype).removeprefix("torch.")]

    functions = {op.sym_name.data: op for op in module.ops if isinstance(op, func.FuncOp)}
    if not functions:
        return None  # nothing to run
    fn = functions.get("forward", next(iter(functions.values())))  # as plait.load runs it
    weights = _random_weights(module, values)
    inputs = [_random(list(declared(t)[0]), t.dtype) for t in fn.function_type.inputs]
    mismatches: list[str] = []

    class Checker(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            op = node.meta.get(OP_META)
            if (
                isinstance(op, CallOp)
                and isinstance(out, torch.Tensor)
                and len(op.results) == 1
                and node.name == op.results[0].name_hint
                and actual(out) != declared(op.results[0].type)
            ):
                mismatches.append(
                    f"{where(op)}: computes {actual(out)}, declares {op.results[0].type}"
                )
            return out

    with _fake_groups(module) as groups, torch.no_grad():
        program = build_program(module, weights, "cpu", groups, fn.sym_name.data)
        outputs = Checker(program.graph_module).run(*inputs)
    for out, type_ in zip(outputs, fn.function_type.outputs):
        if actual(out) != declared(type_):
            mismatches.append(f"output: computes {actual(out)}, declares {type_}")
    return mismatches[0] if mismatches else None


# outcomes: what a case did; the bad ones must not happen
GOOD = ("rejected by parse", "rejected by verify", "accepted, ran", "accepted, run refused")
BAD = ("traceback", "unlocated error", "type mismatch", "roundtrip differs", "hang")


def classify(data: bytes | str) -> tuple[str, str]:
    """(outcome, detail) of reading mutated IR, and running it if accepted."""
    try:
        text = decode_ir_text(data, FILENAME) if isinstance(data, bytes) else data
        module = parse_module(text, FILENAME)
    except IRParseError as exc:
        located = exc.line >= 1 and exc.column >= 1
        located &= str(exc).startswith(f"{FILENAME}:{exc.line}:{exc.column}:")
        return ("rejected by parse" if located else "unlocated error"), str(exc)
    except IRVerifyError as exc:
        located = exc.where.startswith((FILENAME, "module"))
        return ("rejected by verify" if located else "unlocated error"), str(exc)
    except Exception:
        return "traceback", traceback.format_exc()
    try:
        printed = print_module(module)
        if print_module(parse_module(printed)) != printed:
            return "roundtrip differs", printed
        mismatch = computed_type_mismatch(module)
    except PlaitError as exc:
        return ("accepted, run refused" if FILENAME in str(exc) else "unlocated error"), str(exc)
    except Exception:
        return "traceback", traceback.format_exc()
    return ("type mismatch", mismatch) if mismatch else ("accepted, ran", "")


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_mutated_model_ir_is_rejected_with_a_position_or_computes_its_types(compiled, data):
    seeds = _seeds(compiled)
    text = seeds[data.draw(st.integers(0, len(seeds) - 1))]
    rng = data.draw(st.randoms(use_true_random=False))
    if data.draw(st.booleans()):
        case: bytes | str = mutate_bytes(text.encode(), rng)
    else:
        case = mutate_tokens(text, rng)
    outcome, detail = classify(case)
    assert outcome in GOOD, f"{outcome}:\n{detail}"


_SEED_CACHE: list[str] = []


def _seeds(compiled) -> list[str]:
    if not _SEED_CACHE:
        _SEED_CACHE.extend(llama_seeds(compiled("llama-tiny").ir))
    return _SEED_CACHE


# ---- the full run, in worker processes with a time bound per case ---------------


def _serve(conn) -> None:
    torch.set_num_threads(1)
    while True:
        case = conn.recv()
        if case is None:
            return
        conn.send(classify(case))


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()

    def stop(self) -> None:
        self.process.kill()
        self.process.join()


def run_cases(cases: list[tuple[str, bytes | str]], timeout: float, workers: int):
    """Classify each (kind, case) in worker processes; a case that takes longer
    than `timeout` seconds is a hang (its worker is replaced)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    pool = [_Worker(ctx) for _ in range(workers)]
    results: list[tuple[str, str, str]] = [("", "", "")] * len(cases)
    pending = list(enumerate(cases))[::-1]
    busy: dict[int, tuple[int, float]] = {}  # worker -> (case, start)
    warm = 600.0  # the first case of a worker also imports torch and plait
    while pending or busy:
        for w, worker in enumerate(pool):
            if w not in busy and pending:
                index, (_, case) = pending.pop()
                worker.conn.send(case)
                busy[w] = (index, time.monotonic())
        time.sleep(0.005)
        for w in list(busy):
            index, start = busy[w]
            worker = pool[w]
            if worker.conn.poll():
                outcome, detail = worker.conn.recv()
                results[index] = (cases[index][0], outcome, detail)
                del busy[w]
                warm = timeout
            elif time.monotonic() - start > warm or not worker.process.is_alive():
                results[index] = (cases[index][0], "hang", repr(cases[index][1])[:2000])
                worker.stop()
                pool[w] = _Worker(ctx)
                del busy[w]
    for worker in pool:
        worker.conn.send(None)
        worker.process.join(timeout=10)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=2000, help="of each kind (bytes, tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--failures", default="ir_fuzz_failures.txt")
    args = parser.parse_args()

    import plait
    from plait.examples.models import EXAMPLES

    torch.set_num_threads(1)
    model, inputs, shapes = EXAMPLES["llama-tiny"]()
    seeds = llama_seeds(plait.compile(model, inputs, dynamic_shapes=shapes).ir)
    rng = random.Random(args.seed)
    cases: list[tuple[str, bytes | str]] = []
    for i in range(args.cases):
        text = seeds[i % len(seeds)]
        cases.append(("bytes", mutate_bytes(text.encode(), rng)))
        cases.append(("tokens", mutate_tokens(text, rng)))
    start = time.monotonic()
    results = run_cases(cases, args.timeout, args.workers)
    counts = collections.Counter((kind, outcome) for kind, outcome, _ in results)
    print(f"{len(cases)} cases (seed {args.seed}) in {time.monotonic() - start:.0f} s")
    print(f"{'outcome':<24} {'bytes':>7} {'tokens':>7}")
    for outcome in GOOD + BAD:
        print(f"{outcome:<24} {counts['bytes', outcome]:>7} {counts['tokens', outcome]:>7}")
    failures = [r for r in results if r[1] in BAD]
    if failures:
        with open(args.failures, "w") as f:
            for kind, outcome, detail in failures:
                f.write(f"==== {kind}: {outcome}\n{detail}\n")
        print(f"{len(failures)} failures, written to {args.failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
