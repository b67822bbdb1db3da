"""`plait calibrate`: measure this machine and write a hardware file for it.

Times a few kernels with torch (linear and attention throughput per dtype,
an element-wise kernel, a large copy for memory bandwidth, tiny ops for
per-op fixed costs) and all-reduces between two gloo processes over loopback
(t = 2 alpha + n / beta), then writes the TOML the cost model reads.
"""

from __future__ import annotations

import datetime
import itertools
import math
import multiprocessing as mp
import os
import platform
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..ir.dtypes import IR_NAMES


def _times(fn, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def _median_time(fn, repeats: int) -> float:
    """Typical time of a kernel long enough to time reliably."""
    return statistics.median(_times(fn, repeats))


def _trimmed_mean(samples: list[float], cut: float = 0.1) -> float:
    """The mean of the middle of `samples`, the `cut` share at each end left
    out: what many calls cost on average, without a rare stall elsewhere."""
    ordered = sorted(samples)
    drop = int(len(ordered) * cut)
    return statistics.mean(ordered[drop : len(ordered) - drop])


def _best_time(fn, repeats: int) -> float:
    """The fastest of many runs of a microsecond call, which noise only lengthens."""
    return min(_times(fn, repeats))


# (rows, in, out) of linear layers in small transformers
LINEAR_SHAPES = ((128, 512, 512), (128, 512, 2048), (128, 2048, 512), (512, 1024, 1024))


def matmul_flops(dtype: torch.dtype, repeats: int = 7, weights_bytes: int = 256 << 20) -> float:
    """Median FLOP/s of F.linear over transformer-like shapes, each call with
    another weight, so weights come from memory as in a forward pass (which
    touches each once) rather than from a cache the previous call warmed."""
    rates = []
    for rows, k, n in LINEAR_SHAPES:
        x = torch.randn(rows, k).to(dtype)
        ws = [torch.randn(n, k).to(dtype) for _ in range(max(2, weights_bytes // (n * k * 4)))]
        weights = itertools.cycle(ws)
        seconds = _median_time(lambda: torch.nn.functional.linear(x, next(weights)), repeats)
        rates.append(2 * rows * k * n / seconds)
    return statistics.median(rates)


def attention_flops(dtype: torch.dtype, repeats: int = 5) -> float:
    """Median FLOP/s of causal-masked SDPA over sequence lengths, counted as the
    cost model counts attention."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rates = []
    for length in (64, 128, 256, 512):
        b, h, d = 1, 8, 64
        q = torch.randn(b, h, length, d).to(dtype)
        mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
        seconds = _median_time(lambda: sdpa(q, q, q, attn_mask=mask), repeats)
        scores = b * h * length * length
        rates.append((4 * scores * d + 5 * scores) / seconds)
    return statistics.median(rates)


def transcendental_flops(repeats: int = 7) -> float:
    """FLOP/s of a transcendental element-wise kernel (4 FLOPs per element)."""
    x = torch.randn(1 << 20)
    seconds = _median_time(lambda: torch.nn.functional.silu(x), repeats)
    return 4 * x.numel() / seconds


def broadcast_rates(repeats: int = 21) -> dict[str, float]:
    """Elements/s of broadcasting element-wise kernels (1 FLOP per element), by
    result type: f32 arithmetic, and comparisons making a mask (much slower)."""
    col, row = torch.randn(1, 1, 256, 1), torch.randn(1, 1, 1, 256)
    icol, irow = torch.arange(256).view(1, 1, 256, 1), torch.arange(256).view(1, 1, 1, 256)
    kernels = {"f32": lambda: torch.add(col, row), "i1": lambda: torch.le(irow, icol)}
    return {name: 256 * 256 / _median_time(fn, repeats) for name, fn in kernels.items()}


def strided_rate(repeats: int = 21) -> float:
    """Elements/s of an element-wise kernel whose operands are laid out
    differently (a transposed view added to a contiguous tensor)."""
    a, b = torch.randn(1, 256, 8, 64).transpose(1, 2), torch.randn(1, 8, 256, 64)
    return a.numel() / _median_time(lambda: torch.add(a, b), repeats)


def reduce_rate(repeats: int = 21) -> float:
    """Input elements/s of a mean over the last dim, as norms reduce."""
    x = torch.randn(512, 512)
    return x.numel() / _median_time(lambda: torch.mean(x, [-1], True), repeats)


def sequence_overhead(rounds: int = 60) -> float:
    """Seconds each kernel costs beyond its own warm time when kernels follow
    each other as in a transformer block (threads waking, caches refilling)."""
    torch.manual_seed(0)
    x = torch.randn(128, 512)
    up, gate, down = torch.randn(1408, 512), torch.randn(1408, 512), torch.randn(512, 1408)
    norm = torch.randn(512)
    f = torch.nn.functional
    steps = [
        lambda v: torch.pow(v, 2),
        lambda v: torch.mean(v, [-1], True),
        lambda v: torch.rsqrt(torch.add(v, 1e-6)),
        lambda v: torch.mul(x, v),
        lambda v: torch.mul(norm, v),
        lambda v: f.silu(f.linear(v, gate)) * f.linear(v, up),
        lambda v: f.linear(v, down),
        lambda v: torch.add(x, v),
    ]
    inputs, value = [], x
    for step in steps:  # each step's input, for timing it alone
        inputs.append(value)
        value = step(value)

    def block():
        v = x
        for step in steps:
            v = step(v)

    kernels = 12  # the steps above launch this many kernels
    extra = []  # paired in each round, so a slow stretch of time slows both sides
    for _ in range(rounds):
        block()
        start = time.perf_counter()
        block()
        together = time.perf_counter() - start
        alone = 0.0
        for step, v in zip(steps, inputs):
            step(v)  # warm: the same kernel just ran
            start = time.perf_counter()
            step(v)
            alone += time.perf_counter() - start
        extra.append((together - alone) / kernels)
    return max(0.0, statistics.median(extra))


def copy_bandwidth(nbytes: int, repeats: int = 7, best: bool = False) -> float:
    """Bytes/s of a copy whose source and destination total `nbytes`: typical,
    or the fastest of the runs."""
    x = torch.empty(nbytes // 8)
    y = torch.empty_like(x)
    timer = _best_time if best else _median_time
    seconds = timer(lambda: y.copy_(x), max(repeats, 2_000_000 // max(nbytes, 1)))
    return nbytes / seconds


def cache_levels(memory_bandwidth: float) -> list[tuple[int, float]]:
    """(working-set bytes, bytes/s) where copies run faster than from memory.

    Swept rather than read from sysfs: private caches add up over the threads a
    kernel uses, and a VM reports its host's shared cache, of which a guest
    gets only part. Each size keeps its fastest copy (noise from other
    tenants only slows copies down), and no working set is slower than a
    larger one."""
    sizes = [1 << k for k in range(20, 28)]  # 1 MiB to 128 MiB
    speeds = [copy_bandwidth(size, max(15, (1 << 30) // size), best=True) for size in sizes]
    for i in reversed(range(len(speeds) - 1)):
        speeds[i] = max(speeds[i], speeds[i + 1])
    levels: list[tuple[int, float]] = []
    for size, bandwidth in zip(sizes, speeds):
        if bandwidth < 1.2 * memory_bandwidth:
            break
        if levels and bandwidth >= 0.9 * levels[-1][1]:
            levels[-1] = (size, levels[-1][1])  # the same level, larger
        else:
            levels.append((size, bandwidth))
    return levels


def _tiny_calls() -> dict[str, tuple]:
    """Common targets on tiny inputs: their cost is the fixed cost per call."""
    x = torch.ones(2, 4)
    col, row = torch.arange(4).view(1, 1, 4, 1), torch.arange(4).view(1, 1, 1, 4)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    rows, cols = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)
    return {
        "aten::add.Tensor": (x, x),
        "aten::view": (x, [2, 4]),
        "aten::expand": (x, [2, 4]),
        "aten::slice.Tensor": (x, 1, 0, 2),
        "aten::transpose.int": (x, 0, 1),
        "aten::unsqueeze": (x, 0),
        "aten::reshape": (x, [8]),
        "aten::mul.Tensor": (x, x),
        "aten::neg": (x,),
        "aten::cos": (x,),
        "aten::le.Tensor": (col, row),
        "aten::__and__.Tensor": (mask, mask),
        "aten::to.dtype": (x, torch.float64),
        "aten::index.Tensor": (x, [rows, cols]),
        "aten::arange": (8,),
        "aten::new_ones": (x, [2]),
        "aten::mean.dim": (x, [-1], True),
        "aten::cat": ([x, x], -1),
    }


def op_overheads(repeats: int = 2000) -> dict[str, float]:
    """Seconds of fixed cost per call of common targets, called exactly as plait
    programs call them (through ATen's bindings where the backend does)."""
    from ..backends.bindings import fast_call, resolve

    out = {}
    with torch.inference_mode():
        for target, args in _tiny_calls().items():
            kind, callee = fast_call(resolve(target), target)
            if kind == "call_method":
                method, first, rest = callee, args[0], args[1:]
                out[target] = _best_time(lambda: getattr(first, method)(*rest), repeats)
            else:
                out[target] = _best_time(lambda: callee(*args), repeats)
    return out


def _allreduce_worker(rank: int, port: int, sizes: list[int], queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # each all-reduce after a module's worth of compute on both ranks, as programs
    # issue them: the ranks arrive at different times and gloo's threads have gone
    # to sleep (here ~1.5 ms more than all-reduces back to back); the sizes take
    # turns in each round, so that a noisy stretch of time hits them alike.
    # Their times are bimodal on a shared VM (1 MB: a quartile at 0.8 ms, the
    # next at 3.4, from waking a peer thread): the median jumps between the
    # modes from run to run, and a step pays the mean of what it issues
    a, w = torch.randn(128, 1024), torch.randn(1024, 1024)
    buffers = {n: torch.ones(n // 4) for n in sizes}
    times: dict[int, list[float]] = {n: [] for n in sizes}
    computed: list[float] = []
    for _ in range(31):
        for n, x in buffers.items():
            computed.append(_after_linears(a, w, 3, x, times[n]))
    skew = _skew(a, w, buffers[min(sizes)])
    # the all-reduce alone: less what the ranks' drift during the 3 linears added
    # (the cost model adds it back for the compute a program does between collectives)
    drift = skew * _trimmed_mean(computed)
    results = [(n, _trimmed_mean(t) - drift) for n, t in times.items()]
    share = _contention(a, w, buffers[max(sizes)], _trimmed_mean(times[max(sizes)]))
    if rank == 0:
        queue.put((results, share, skew))
    dist.barrier()
    dist.destroy_process_group()


def _after_linears(a, w, count: int, x, times: list[float]) -> float:
    """`count` linears, then an all-reduce of `x` timed into `times`; returns
    the linears' seconds."""
    import torch.distributed as dist

    start = time.perf_counter()
    for _ in range(count):
        torch.nn.functional.linear(a, w)
    reduce = time.perf_counter()
    dist.all_reduce(x)
    times.append(time.perf_counter() - reduce)
    return reduce - start


def _skew(a, w, x, few: int = 1, many: int = 16, rounds: int = 31) -> float:
    """Seconds a small all-reduce waits for its peer per second of compute
    before it: after `few` and after `many` linears, in alternating rounds
    (the ranks' compute times drift apart; on this 2-core VM 0-0.12 in six runs)."""
    waits: dict[int, list[float]] = {few: [], many: []}
    computed: dict[int, list[float]] = {few: [], many: []}
    for _ in range(rounds):
        for count in (few, many):
            computed[count].append(_after_linears(a, w, count, x, waits[count]))
    longer = _trimmed_mean(computed[many]) - _trimmed_mean(computed[few])
    waited = _trimmed_mean(waits[many]) - _trimmed_mean(waits[few])
    return min(1.0, max(0.0, waited / longer))


def _contention(a, w, x, reduce_time: float, rounds: int = 15) -> float:
    """The share of an async all-reduce's time that the compute it overlaps
    loses: compute of about twice its time, alone and with the all-reduce in
    flight, in alternating rounds; (overlapped - alone) / the all-reduce's time."""
    import torch.distributed as dist

    linear = _median_time(lambda: torch.nn.functional.linear(a, w), 7)
    count = max(1, math.ceil(2 * reduce_time / linear))

    def compute():
        for _ in range(count):
            torch.nn.functional.linear(a, w)

    alone, overlapped = [], []
    for _ in range(rounds):
        dist.barrier()
        start = time.perf_counter()
        compute()
        alone.append(time.perf_counter() - start)
        dist.barrier()
        start = time.perf_counter()
        work = dist.all_reduce(x, async_op=True)
        compute()
        work.wait()
        overlapped.append(time.perf_counter() - start)
    lost = statistics.median(overlapped) - statistics.median(alone)
    return min(1.0, max(0.0, lost / reduce_time))


def gloo_all_reduce(
    sizes=(4096, 65536, 1 << 20, 4 << 20, 16 << 20),
) -> tuple[float, float, float, float]:
    """(alpha seconds, beta bytes/s, contention share, skew) of 2-rank gloo
    all-reduce on loopback."""
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_allreduce_worker, args=(r, port, list(sizes), queue)) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    try:
        results, share, skew = queue.get(timeout=300)
    except Exception as exc:
        codes = [p.exitcode for p in procs]
        raise RuntimeError(
            f"the gloo all-reduce measurement failed (worker exit codes {codes})"
        ) from exc
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    # t = 2 alpha + n / beta (ring all-reduce, p = 2): the smallest message gives the
    # latency, the spread to the largest the bandwidth (a least-squares line over all
    # sizes is ruled by the large ones and its intercept lost ~100 us here)
    (n_small, t_small), (n_large, t_large) = min(results), max(results)
    alpha = max((t_small - n_small * (t_large - t_small) / (n_large - n_small)) / 2, 1e-7)
    return alpha, (n_large - n_small) / max(t_large - t_small, 1e-12), share, skew


def _memory_capacity() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 16e9


@dataclass
class Measurements:
    """What `measure` found on this machine (rates in FLOP/s, bytes/s; times in s)."""

    threads: int
    flops: dict[str, float]  # per IR dtype name
    attention: dict[str, float]
    transcendental: float
    broadcast: dict[str, float]
    strided: float
    reduce: float
    bandwidth: float
    caches: list[tuple[int, float]]
    capacity: float
    overheads: dict[str, float]
    in_sequence: float
    link: tuple[float, float, float, float]  # gloo all-reduce (alpha, beta, contention, skew)
    where: str  # the machine, in words
    when: str


def calibrate(progress=print) -> str:
    """Measure this machine; return the hardware file's text."""
    return hardware_text(measure(progress))


def measure(progress=print) -> Measurements:
    """Time the kernels, copies and all-reduces the hardware file describes."""
    threads = torch.get_num_threads()
    dtypes = (torch.float32, torch.bfloat16)
    name = {d: IR_NAMES[str(d).removeprefix("torch.")] for d in dtypes}
    progress(f"matmul and attention throughput ({threads} torch threads)")
    flops = {name[d]: matmul_flops(d) for d in dtypes}
    attention = {name[d]: attention_flops(d) for d in dtypes}
    transcendental = transcendental_flops()
    broadcast = broadcast_rates()
    strided = strided_rate()
    reduce = reduce_rate()
    progress("memory and cache bandwidth")
    bandwidth = copy_bandwidth(512 << 20)
    caches = cache_levels(bandwidth)
    progress("per-op overheads")
    overheads = op_overheads()
    in_sequence = sequence_overhead()
    progress("gloo all-reduce between 2 processes")
    link = gloo_all_reduce()
    cpu = platform.processor() or platform.machine()
    return Measurements(
        threads=threads,
        flops=flops,
        attention=attention,
        transcendental=transcendental,
        broadcast=broadcast,
        strided=strided,
        reduce=reduce,
        bandwidth=bandwidth,
        caches=caches,
        capacity=_memory_capacity(),
        overheads=overheads,
        in_sequence=in_sequence,
        link=link,
        where=f"{platform.node() or 'this machine'} ({cpu}, {os.cpu_count()} cores)",
        when=datetime.date.today().isoformat(),
    )


def hardware_text(m: Measurements) -> str:
    """The hardware file (TOML, as hardware/spec.py reads it) of the measurements."""
    how = f"measured by `plait calibrate` on {m.when}, {m.where}, torch {torch.__version__}"
    default_op, default_view = m.overheads["aten::add.Tensor"], m.overheads["aten::view"]
    alpha, beta, share, skew = m.link
    lines = [
        "# This CPU, as measured by `plait calibrate` (re-run it to refresh).",
        'name = "cpu"',
        f'description = "{m.where}, {m.threads} torch threads"',
        "",
        "[compute]  # FLOP/s of F.linear, median over transformer-like shapes",
        *(f"{k} = {v:.4g}" for k, v in m.flops.items()),
        "",
        "[compute.attention]  # causal SDPA, 8 heads x 64-512 positions x 64, median",
        *(f"{k} = {v:.4g}" for k, v in m.attention.items()),
        "",
        "[compute.transcendental]  # silu on 1M floats, 4 FLOPs per element",
        f"f32 = {m.transcendental:.4g}",
        "",
        "[compute.broadcast]  # [256, 1] + [1, 256] (f32), <= on integers (i1), per element",
        *(f"{k} = {v:.4g}" for k, v in m.broadcast.items()),
        "",
        "[compute.strided]  # a transposed [8, 256, 64] view + a contiguous one, per element",
        f"f32 = {m.strided:.4g}",
        "",
        "[compute.reduce]  # mean over the last dim of [512, 512], per input element",
        f"f32 = {m.reduce:.4g}",
        "",
        "[memory]",
        f"bandwidth = {m.bandwidth:.4g}  # bytes/s, a 512 MiB copy (read + write)",
        f"capacity = {m.capacity:.4g}  # bytes, MemTotal",
        "",
        *(
            f"[[memory.caches]]\nbytes = {size}\nbandwidth = {bw:.4g}  # a copy this size in all\n"
            for size, bw in m.caches
        ),
        "[host]  # the host tier: a safetensors file in the page cache, read like a copy",
        f"bandwidth = {m.bandwidth:.4g}",
        "",
        "[overhead]  # seconds of fixed cost per op, called as plait programs call them",
        f"op = {default_op:.4g}  # aten::add.Tensor on 8 elements",
        f"view = {default_view:.4g}  # aten::view",
        f"sequence = {m.in_sequence:.4g}  # extra per kernel when kernels run back to back",
        "",
        "[overhead.targets]",
        *(f'"{k}" = {v:.4g}' for k, v in m.overheads.items()),
        "",
        "[threads]  # element-wise kernels of at most `grain` elements run on one thread",
        f"count = {m.threads}",
        "grain = 32768  # ATen's at::internal::GRAIN_SIZE",
        "",
        "[[links]]",
        'name = "gloo over loopback (2 processes)"',
        f"bandwidth = {beta:.4g}  # bytes/s, mean 2-rank all-reduces of 4 KB to 16 MB after compute",
        f"latency = {alpha:.4g}  # seconds per step, same measurement, less the ranks' drift",
        f"contention = {share:.3g}  # share of a 16 MB async all-reduce's time lost by the "
        "compute it overlaps",
        f"skew = {skew:.3g}  # seconds a 4 KB all-reduce waits per second of compute before it",
        "scatter_as_all_reduce = true  # plait runs a float reduce-scatter on gloo as one",
        "",
        "[sources]",
        f'all = "{how}"',
    ]
    return "\n".join(lines) + "\n"


def write(path: str | Path, progress=print) -> Path:
    path = Path(path)
    path.write_text(calibrate(progress))
    return path
