"""`plait calibrate`: measure this machine and write a hardware file for it.

Times a few kernels with torch (matmul throughput per dtype, a large copy for
memory bandwidth, tiny ops for per-op overhead) and all-reduces between two
gloo processes over loopback (latency and bandwidth by a least-squares fit of
t = 2 alpha + n / beta), then writes the TOML the cost model reads.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import torch

from ..ir.dtypes import IR_NAMES


def _median_time(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def matmul_flops(dtype: torch.dtype, size: int = 1024, repeats: int = 7) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    seconds = _median_time(lambda: torch.mm(a, b), repeats)
    return 2 * size**3 / seconds


def memory_bandwidth(megabytes: int = 256, repeats: int = 7) -> float:
    x = torch.empty(megabytes * 2**20 // 4)
    y = torch.empty_like(x)
    seconds = _median_time(lambda: y.copy_(x), repeats)
    return 2 * x.numel() * 4 / seconds  # read + write


def op_overheads(repeats: int = 2000) -> tuple[float, float]:
    """Seconds per tiny kernel op and per view op (dispatch, no work)."""
    x = torch.ones(8)
    with torch.inference_mode():
        kernel = _median_time(lambda: torch.add(x, x), repeats)
        view = _median_time(lambda: x.view(2, 4), repeats)
    return kernel, view


def _allreduce_worker(rank: int, port: int, sizes: list[int], queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = []
    for n in sizes:
        x = torch.ones(n // 4)
        results.append((n, _median_time(lambda: dist.all_reduce(x), repeats=15)))
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def gloo_all_reduce(sizes=(4096, 65536, 1 << 20, 4 << 20, 16 << 20)) -> tuple[float, float]:
    """(alpha seconds, beta bytes/s) of 2-rank gloo all-reduce on loopback."""
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
    results = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=30)
    # least squares: t = 2 alpha + n / beta  (ring all-reduce, p = 2)
    n = [float(a) for a, _ in results]
    t = [b for _, b in results]
    mean_n, mean_t = statistics.fmean(n), statistics.fmean(t)
    slope = sum((x - mean_n) * (y - mean_t) for x, y in zip(n, t)) / sum(
        (x - mean_n) ** 2 for x in n
    )
    intercept = mean_t - slope * mean_n
    return max(intercept / 2, 1e-7), 1.0 / max(slope, 1e-15)


def _memory_capacity() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 16e9


def calibrate(progress=print) -> str:
    """Measure this machine; return the hardware file's text."""
    threads = torch.get_num_threads()
    progress(f"matmul throughput ({threads} threads)")
    flops = {
        IR_NAMES[str(d).removeprefix("torch.")]: matmul_flops(d)
        for d in (torch.float32, torch.bfloat16)
    }
    progress("memory bandwidth")
    bandwidth = memory_bandwidth()
    progress("per-op overhead")
    kernel, view = op_overheads()
    progress("gloo all-reduce between 2 processes")
    alpha, beta = gloo_all_reduce()
    stamp = datetime.date.today().isoformat()
    where = f"{platform.node() or 'this machine'} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    how = f"measured by `plait calibrate` on {stamp}, {where}, torch {torch.__version__}"
    lines = [
        "# This CPU, as measured by `plait calibrate` (re-run it to refresh).",
        'name = "cpu"',
        f'description = "{where}, {threads} torch threads"',
        "",
        "[compute]  # FLOP/s of a 1024x1024 matmul",
        *(f"{k} = {v:.4g}" for k, v in flops.items()),
        "",
        "[memory]",
        f"bandwidth = {bandwidth:.4g}  # bytes/s, a 256 MiB copy (read + write)",
        f"capacity = {_memory_capacity():.4g}  # bytes, MemTotal",
        "",
        "[overhead]",
        f"op = {kernel:.4g}  # seconds, torch.add on 8 elements",
        f"view = {view:.4g}  # seconds, Tensor.view",
        "",
        "[[links]]",
        'name = "gloo over loopback (2 processes)"',
        f"bandwidth = {beta:.4g}  # bytes/s, fit of 2-rank all-reduce times, 4 KB to 16 MB",
        f"latency = {alpha:.4g}  # seconds per step, same fit",
        "",
        "[sources]",
        f'all = "{how}"',
    ]
    return "\n".join(lines) + "\n"


def write(path: str | Path, progress=print) -> Path:
    path = Path(path)
    path.write_text(calibrate(progress))
    return path
