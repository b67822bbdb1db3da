"""Helpers shared by tests."""

import torch
from plait.runtime.workers import free_port, pack, unpack


def max_rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference relative to the reference's scale."""
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _rank_processes():
    """Processes forked from a server that imported torch, plait and
    transformers once: a rank starts in milliseconds, not in seconds of imports."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["helpers", "plait.api", "plait.training", "transformers", "torch._dynamo"]
    )
    return ctx


def run_ranks(world_size: int, fn, *args, timeout: float = 120.0) -> list:
    """Run fn(rank, world_size, *args) in `world_size` gloo processes; return their results."""
    ctx = _rank_processes()
    port = free_port()
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(rank, world_size, port, queue, fn, args))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = unpack(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]


def _rank_main(rank, world_size, port, queue, fn, args):
    import traceback

    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        queue.put((rank, True, pack(fn(rank, world_size, *args))))
    except Exception:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


COLLECTIVES_IR = """\
builtin.module {
  func.func @forward(%x : !plait.tensor<[4, 6], f32>) -> (!plait.tensor<[4, 6], f32>, !plait.tensor<[4, 6], f32>, !plait.tensor<[4, 12], f32>, !plait.tensor<[2, 6], f32>, !plait.tensor<[4, 3], f32>, !plait.tensor<[4, 6], f32>, !plait.tensor<[8, 3], f32>, !plait.tensor<[1, 8, 6], f32>, !plait.tensor<[1, 2, 6], f32>) {
    %s = plait.all_reduce %x {axis = "tp", reduce = "sum"} : !plait.tensor<[4, 6], f32> -> !plait.tensor<[4, 6], f32>
    %h = plait.all_reduce %x {axis = "tp", reduce = "max", async} : !plait.tensor<[4, 6], f32> -> !plait.async<!plait.tensor<[4, 6], f32>>
    %e = plait.elementwise "aten::exp"(%x) : !plait.tensor<[4, 6], f32>
    %m = plait.wait %h : !plait.async<!plait.tensor<[4, 6], f32>> -> !plait.tensor<[4, 6], f32>
    %g = plait.all_gather %e {axis = "tp", dim = 1 : i64} : !plait.tensor<[4, 6], f32> -> !plait.tensor<[4, 12], f32>
    %r = plait.reduce_scatter %x {axis = "tp", dim = 0 : i64, reduce = "sum"} : !plait.tensor<[4, 6], f32> -> !plait.tensor<[2, 6], f32>
    %c = plait.reduce_scatter %x {axis = "tp", dim = 1 : i64, reduce = "sum"} : !plait.tensor<[4, 6], f32> -> !plait.tensor<[4, 3], f32>
    %n = plait.elementwise "aten::neg"(%x) : !plait.tensor<[4, 6], f32>
    %i = plait.all_reduce %n {axis = "tp", reduce = "sum"} : !plait.tensor<[4, 6], f32> -> !plait.tensor<[4, 6], f32>
    %a = plait.all_to_all %x {axis = "tp", split_dim = 1 : i64, concat_dim = 0 : i64} : !plait.tensor<[4, 6], f32> -> !plait.tensor<[8, 3], f32>
    %x1 = plait.reshape "aten::unsqueeze"(%x, 0) : !plait.tensor<[1, 4, 6], f32>
    %gs = plait.all_gather %x1 {axis = "tp", dim = 1 : i64} : !plait.tensor<[1, 4, 6], f32> -> !plait.tensor<[1, 8, 6], f32>
    %rs = plait.reduce_scatter %x1 {axis = "tp", dim = 1 : i64, reduce = "sum"} : !plait.tensor<[1, 4, 6], f32> -> !plait.tensor<[1, 2, 6], f32>
    func.return %s, %m, %g, %r, %c, %i, %a, %gs, %rs : !plait.tensor<[4, 6], f32>, !plait.tensor<[4, 6], f32>, !plait.tensor<[4, 12], f32>, !plait.tensor<[2, 6], f32>, !plait.tensor<[4, 3], f32>, !plait.tensor<[4, 6], f32>, !plait.tensor<[8, 3], f32>, !plait.tensor<[1, 8, 6], f32>, !plait.tensor<[1, 2, 6], f32>
  }
}
"""


def collectives_rank(rank: int, world_size: int):
    """Run COLLECTIVES_IR on this rank with input filled with rank-dependent values."""
    import torch.distributed as dist
    from plait.backends.fx import CollectiveGroups, build_program, mesh_coords
    from plait.ir.text import parse_module
    from plait.ir.weights import WeightStore

    mesh = {"tp": world_size}
    groups = CollectiveGroups({"tp": dist.group.WORLD.group_name}, mesh, mesh_coords(mesh, rank))
    program = build_program(parse_module(COLLECTIVES_IR), WeightStore(), groups=groups)
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6) + 100 * rank
    return [t.clone() for t in program(x)], program.code


def artifact_rank(rank: int, world_size: int, directory: str, inputs: list):
    """Load a sharded artifact on this rank and run it on `inputs`."""
    import plait

    model = plait.load(directory)
    with torch.inference_mode():
        out = model(*inputs)
    return out.clone(), model.code if rank == 0 else ""


def assert_ranks_match_eager(program, model, directory, ranks: int = 2) -> None:
    """Save `program`, run it on gloo ranks on inputs of new sizes (batch 3, 11
    tokens), and compare every rank's output with the eager model's."""
    from plait.frontend import hf

    inputs = hf.example_inputs(model.model, 3, 11)
    with torch.no_grad():
        ref = model(*inputs)
    program.save(directory)
    for out, _ in run_ranks(ranks, artifact_rank, str(directory), list(inputs)):
        assert max_rel_diff(out, ref) <= 1e-5


def dispatch_rank(rank: int, world_size: int, tokens, token_of_row, offsets):
    """plait::expert_dispatch on this rank's block of `tokens` (the whole routing known)."""
    import torch.distributed as dist
    from plait.customops.experts import expert_dispatch

    held = tokens.shape[0] // world_size
    mine = tokens[rank * held : (rank + 1) * held]
    return expert_dispatch(mine, token_of_row, offsets, dist.group.WORLD.group_name)


def check_calibrated_hardware(path, compiled_model) -> None:
    """A file `plait calibrate` wrote describes this machine and the cost model reads it."""
    from plait.hardware import load

    hardware = load(path)
    assert hardware.peak_flops("f32") > 1e9 and hardware.memory_bandwidth > 1e9
    assert hardware.links[0].devices is None and hardware.links[0].latency > 0
    assert hardware.links[0].scatter_as_all_reduce  # as plait runs reduce-scatters on gloo
    assert "aten::index.Tensor" in hardware.target_overhead
    for family in ("transcendental", "strided", "reduce"):
        assert hardware.family_flops[family]["f32"] > 1e6
    assert set(hardware.family_flops["broadcast"]) == {"f32", "i1"}
    assert hardware.threads == torch.get_num_threads() and hardware.grain == 32768
    sizes = [size for size, _ in hardware.caches]
    assert sizes == sorted(sizes) and all(
        bw > hardware.memory_bandwidth for _, bw in hardware.caches
    )
    result = compiled_model.estimate(hardware, values={"batch": 1, "seq": 32})
    assert result.schedule.step_time > 0
