"""A hardware description: what the cost model needs to know about a machine.

One TOML file per machine in this folder (or any path), each figure quoted
with its public source:

    name = "h100-sxm"
    [compute]            # peak dense FLOP/s per element type
    bf16 = 989.4e12
    [compute.attention]  # optional: what a class of kernels reaches
    bf16 = 600e12        # (attention, transcendental)
    [memory]
    bandwidth = 2.9e12   # bytes/s a streaming kernel sustains (not the peak)
    capacity = 80e9      # bytes
    [[memory.caches]]    # optional, smallest first: working sets that fit
    bytes = 2e6          # stream at the cache's bandwidth
    bandwidth = 100e9
    [overhead]
    op = 4e-6            # seconds per launched op
    view = 0.0           # seconds per view op (no kernel)
    sequence = 0.0       # extra seconds per kernel when kernels run back to back
    [overhead.targets]   # optional: ops with their own fixed cost
    "aten::index.Tensor" = 12e-6
    [threads]            # optional (CPUs): element-wise kernels of at most
    count = 2            # `grain` elements run on one of `count` threads
    grain = 32768
    [[links]]            # innermost first: the devices a link joins
    name = "NVLink 4 via NVSwitch"
    devices = 8
    bandwidth = 450e9    # bytes/s per device per direction
    latency = 3e-6       # alpha of one step of a collective, seconds
    contention = 0.0     # optional: the share of a collective's time its own work
                         # takes from the compute it overlaps (gloo on the CPU's cores)
    skew = 0.0           # optional: seconds a collective waits for its peers to
                         # arrive, per second of compute since the rank's last one
    scatter_as_all_reduce = false  # optional: plait runs a float reduce-scatter
                         # here as an all-reduce (gloo: faster than its own)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import sympy

from ..ir.errors import PlaitError

HERE = Path(__file__).parent


class HardwareError(PlaitError):
    """A hardware name or file that plait cannot use."""


@dataclass(frozen=True)
class Link:
    """An interconnect level: up to `devices` devices joined at this bandwidth."""

    name: str
    devices: int | None  # None: unbounded (a network)
    bandwidth: float  # bytes/s per device, one direction
    latency: float  # seconds per collective step
    # share of an async collective's time that the compute it overlaps loses
    # (0: the link moves data by itself; gloo's threads share the CPU's cores)
    contention: float = 0.0
    # seconds a collective waits for the ranks to arrive, per second of compute
    # each did since its previous collective (their compute times drift apart)
    skew: float = 0.0
    # plait's programs run a float reduce-scatter over this link as an
    # all-reduce, then keep their piece (backends/fx on gloo, where that is
    # faster than gloo's own reduce-scatter): priced as that all-reduce
    scatter_as_all_reduce: bool = False


@dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    flops: dict[str, float]  # element type -> peak FLOP/s
    # kernel class ("attention", "transcendental") -> element type -> FLOP/s it reaches
    family_flops: dict[str, dict[str, float]]
    memory_bandwidth: float
    memory_capacity: float
    # (bytes, bandwidth) per cache level, smallest first: working sets that fit
    # stream at that level's bandwidth
    caches: tuple[tuple[float, float], ...]
    op_overhead: float
    view_overhead: float
    sequence_overhead: float  # extra per kernel in a program over the same kernel alone
    target_overhead: dict[str, float]  # schema name -> seconds, where it differs from `op`
    links: tuple[Link, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)
    host_bandwidth: float | None = None  # bytes/s from the host tier to this device
    threads: int = 1  # threads a kernel may split over (CPUs) ...
    grain: int = 0  # ... once it has more than this many elements

    def peak_flops(self, dtype: str, family: str | None = None) -> float:
        """FLOP/s for an element type (integer types use i8 or f32), for a kernel
        class where the file gives its own rate."""
        table = self.family_flops.get(family, {}) if family else {}
        if dtype in table:
            return table[dtype]
        if dtype.startswith(("i", "u")) and "f32" in table:
            return table["f32"]  # integer kernels of a class the file rates for floats
        if dtype in self.flops:
            return self.flops[dtype]
        fallback = "i8" if dtype.startswith(("i", "u")) and "i8" in self.flops else "f32"
        return self.flops[fallback]

    def overhead(self, target: str | None, view: bool) -> float:
        """Fixed seconds per op: the target's own figure, else the view or op default."""
        if target in self.target_overhead:
            return self.target_overhead[target]
        return self.view_overhead if view else self.op_overhead

    def roofline(
        self, flops, moved, dtype: str, family=None, target=None, weights=0, elements=None
    ):
        """Seconds of a kernel of `flops` at the rate of `family` in `dtype`
        that moves `moved` bytes (see `kernel_time`)."""
        compute = flops / self.peak_flops(dtype, family)
        return self.kernel_time(compute, moved, target, weights, elements)

    def kernel_time(self, compute, moved, target=None, weights=0, elements=None):
        """Seconds of a kernel: max(compute, memory) plus its fixed cost. Weights
        (`weights` of the `moved` bytes) stream from memory, as a forward pass
        touches each once; activations that fit in a cache (where the file
        describes one) stream at that cache's bandwidth. A kernel that splits
        its `elements` over threads in chunks of `grain` runs on one thread
        when it has no more than that."""
        activations = moved - weights
        bandwidth = self.memory_bandwidth
        if self.caches:
            bandwidth = sympy.Piecewise(
                *((bw, activations <= size) for size, bw in self.caches),
                (self.memory_bandwidth, True),
            )
        memory = activations / bandwidth + weights / self.memory_bandwidth
        fixed = self.overhead(target, view=False) + self.sequence_overhead
        work = sympy.Max(compute, memory)
        if elements is not None and self.threads > 1 and self.grain:
            work = sympy.Piecewise((self.threads * work, elements <= self.grain), (work, True))
        return work + fixed

    def shared_by(self, ranks: int) -> Hardware:
        """One of `ranks` ranks on this host. A CPU file (`threads` > 1)
        measured its rates with all its threads: each rank gets
        threads // ranks of them (at least one, as plait's worker ranks and
        torchrun give them) and that share of the compute rates and memory
        bandwidth. A device per rank (a GPU file) is not shared."""
        per_rank = max(1, self.threads // max(1, ranks))
        if per_rank == self.threads:
            return self
        share = per_rank / self.threads
        return replace(
            self,
            flops={k: v * share for k, v in self.flops.items()},
            family_flops={
                f: {k: v * share for k, v in rates.items()}
                for f, rates in self.family_flops.items()
            },
            memory_bandwidth=self.memory_bandwidth * share,
            caches=tuple((size, bw * share) for size, bw in self.caches),
            host_bandwidth=self.host_bandwidth and self.host_bandwidth * share,
            threads=per_rank,
        )

    def link_for(self, devices: int) -> Link:
        """The innermost link that joins `devices` devices."""
        for link in self.links:
            if link.devices is None or devices <= link.devices:
                return link
        largest = max((l.devices or 0 for l in self.links), default=1)
        raise HardwareError(
            f"{self.name}: a group of {devices} devices is larger than one node "
            f"({largest} devices) and the file describes no link between nodes; "
            "add a [[links]] entry without `devices` (e.g. InfiniBand) or use a smaller mesh"
        )


def available() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.toml"))


def _require(table: dict, key: str, where: str):
    if key not in table:
        raise HardwareError(f"{where}: missing '{key}'")
    return table[key]


def load(name_or_path: str | Path) -> Hardware:
    """A shipped description by name ('h100-sxm'), or a TOML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = HERE / f"{name_or_path}.toml"
        if not path.is_file():
            raise HardwareError(
                f"unknown hardware '{name_or_path}'; known: {', '.join(available())} "
                "(or give the path of a .toml file, e.g. one written by `plait calibrate`)"
            )
    if not path.is_file():
        raise HardwareError(f"{path}: no such hardware file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise HardwareError(f"{path}: invalid TOML: {exc}") from None
    where = str(path)
    compute = _require(data, "compute", where)
    memory = _require(data, "memory", where)
    overhead = data.get("overhead", {})
    links = tuple(
        Link(
            name=_require(entry, "name", f"{where} [[links]]"),
            devices=entry.get("devices"),
            bandwidth=float(_require(entry, "bandwidth", f"{where} [[links]]")),
            latency=float(_require(entry, "latency", f"{where} [[links]]")),
            contention=_share(entry.get("contention", 0.0), f"{where} [[links]] contention"),
            skew=_share(entry.get("skew", 0.0), f"{where} [[links]] skew"),
            scatter_as_all_reduce=_flag(
                entry.get("scatter_as_all_reduce", False),
                f"{where} [[links]] scatter_as_all_reduce",
            ),
        )
        for entry in data.get("links", [])
    )
    return Hardware(
        name=data.get("name", path.stem),
        description=data.get("description", ""),
        flops={k: float(v) for k, v in compute.items() if not isinstance(v, dict)},
        family_flops={
            family: {k: float(v) for k, v in table.items()}
            for family, table in compute.items()
            if isinstance(table, dict)
        },
        memory_bandwidth=float(_require(memory, "bandwidth", f"{where} [memory]")),
        memory_capacity=float(_require(memory, "capacity", f"{where} [memory]")),
        caches=tuple(
            (
                float(_require(c, "bytes", f"{where} [[memory.caches]]")),
                float(_require(c, "bandwidth", f"{where} [[memory.caches]]")),
            )
            for c in memory.get("caches", [])
        ),
        op_overhead=float(overhead.get("op", 0.0)),
        view_overhead=float(overhead.get("view", 0.0)),
        sequence_overhead=float(overhead.get("sequence", 0.0)),
        target_overhead={k: float(v) for k, v in overhead.get("targets", {}).items()},
        links=links,
        sources=data.get("sources", {}),
        host_bandwidth=float(data["host"]["bandwidth"]) if "host" in data else None,
        threads=int(data.get("threads", {}).get("count", 1)),
        grain=int(data.get("threads", {}).get("grain", 0)),
    )


def _flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise HardwareError(f"{where}: {value!r} is not true or false")
    return value


def _share(value, where: str) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise HardwareError(f"{where}: {value!r} is not a share between 0 and 1")
    return float(value)
