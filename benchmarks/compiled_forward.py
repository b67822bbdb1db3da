"""plait's forward against torch.compile(model): cold compile time and speed.

    python benchmarks/compiled_forward.py                  # 120M Llama, 1x128, 1 and 2 threads
    python benchmarks/compiled_forward.py --layers 24 --cold 3 --rounds 11

Compile: each variant compiles in a process of its own with an empty
Inductor cache (cold), then again in another process over the cache the
first one left (warm); the time is from the call that compiles to the first
output. Repeats run the variants in turn; the ratio is the median of the
per-repeat ratios to torch.compile's.

Speed: for each thread count, one process compiles every variant under that
count (Inductor's C++ kernels keep the thread count they were compiled
with), checks each output within 1e-5 of eager's (relative to its scale),
then times them in interleaved rounds; ratios to torch.compile are medians
of the per-round ratios, with their IQR and range.

Variants: plait's default pipeline (unfused ATen calls), plait with `fuse`
(the program as one graph), plait with `fuse{scope=blocks}` (each residual
block compiled once, reused by the layers that repeat it), torch.compile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from overhead import small_llama
from rounds import checked_rounds

VARIANTS = {
    "plait": "canonicalize,cse,dce",
    "plait fuse": "canonicalize,cse,dce,fuse",
    "plait fuse{scope=blocks}": "canonicalize,cse,dce,fuse{scope=blocks}",
    "torch.compile": None,
}
BASELINE = "torch.compile"


def _model(layers: int):
    from plait.frontend import hf

    model = small_llama(layers)
    return hf.wrap(model), hf.example_inputs(model, 1, 128)


def _compile(name: str, wrapper, inputs):
    import plait

    pipeline = VARIANTS[name]
    if pipeline is None:
        return torch.compile(wrapper)
    return plait.compile(wrapper, inputs, pipeline=pipeline)


def _logits(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def compile_once(name: str, layers: int) -> float:
    """Seconds from compiling `name` to its first output (in this process)."""
    wrapper, inputs = _model(layers)
    start = time.perf_counter()
    with torch.inference_mode():
        _compile(name, wrapper, inputs)(*inputs)
    return time.perf_counter() - start


def speed(layers: int, rounds: int) -> dict[str, list[float]]:
    wrapper, inputs = _model(layers)
    fns = {"eager": wrapper} | {n: _compile(n, wrapper, inputs) for n in VARIANTS}
    variants = {name: (lambda fn=fn: _logits(fn(*inputs))) for name, fn in fns.items()}
    with torch.inference_mode():  # the check is also the warm-up (and the compile)
        return checked_rounds(variants, _logits(wrapper(*inputs)), rounds, barrier=lambda: None)


def _child(args: list[str], env: dict) -> dict:
    command = [sys.executable, __file__, *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return f"{statistics.median(values):.3f} (IQR {q[0]:.3f}-{q[2]:.3f}, range {min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--cold", type=int, default=3, help="cold compiles of each variant")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--compile-only", help=argparse.SUPPRESS)
    parser.add_argument("--speed-only", type=int, help=argparse.SUPPRESS)  # its thread count
    args = parser.parse_args()
    if args.compile_only:
        torch.set_num_threads(1)
        print(json.dumps(compile_once(args.compile_only, args.layers)))
        return
    if args.speed_only:
        torch.set_num_threads(args.speed_only)
        print(json.dumps(speed(args.layers, args.rounds)))
        return

    print(f"Llama, hidden 768, {args.layers} layers, forward 1x128, fp32")
    cold = {name: [] for name in VARIANTS}
    warm = {name: [] for name in VARIANTS}
    for _ in range(args.cold):
        for name in VARIANTS:
            with tempfile.TemporaryDirectory() as cache:
                env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache}
                child = ["--compile-only", name, "--layers", str(args.layers)]
                cold[name].append(_child(child, env))
                warm[name].append(_child(child, env))
    print(f"\ncompile, 1 thread, {args.cold} repeats: seconds to the first output")
    print(f"{'variant':<26} {'cold s':>8} {'warm s':>8}  cold / torch.compile's")
    for name in VARIANTS:
        ratios = [a / b for a, b in zip(cold[name], cold[BASELINE])]
        print(
            f"{name:<26} {statistics.median(cold[name]):>8.2f} "
            f"{statistics.median(warm[name]):>8.2f}  {_spread(ratios)}"
        )
    for threads in args.threads:
        child = ["--speed-only", str(threads), "--layers", str(args.layers)]
        times = _child([*child, "--rounds", str(args.rounds)], dict(os.environ))
        print(f"\nforward, {threads} thread(s), {args.rounds} interleaved rounds")
        print(f"{'variant':<26} {'ms':>8}  / torch.compile")
        for name, values in times.items():
            ratios = [a / b for a, b in zip(values, times[BASELINE])]
            print(f"{name:<26} {statistics.median(values) * 1e3:>8.1f}  {_spread(ratios)}")


if __name__ == "__main__":
    main()
