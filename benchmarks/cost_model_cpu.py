"""Cost model vs measurement on this machine, for the ops of a small Llama.

    plait calibrate -o /tmp/cpu.toml && python benchmarks/cost_model_cpu.py --hardware /tmp/cpu.toml
    python benchmarks/cost_model_cpu.py                 # the shipped hardware/cpu.toml

Measures each op of the compiled forward (the fastest of repeated runs of the
op on its own inputs, median over several passes of the forward, since this
VM's neighbours slow whole stretches of time down) and the whole forward
(median of plain runs, a few after each pass), predicts both with the cost
model, and prints Kendall's tau between predicted and measured per-op times,
pooled (goal >= 0.8) and within each op class (the IR op family: linear,
elementwise, reshape = views, ...; goal >= 0.6 for elementwise and reshape),
and the total's error (goal within +-25%). Then the same forward through
`fuse` (Inductor's fused kernels): its measured time against the model's
prediction with fusion groups (`cost/fusion.py`) and op by op.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def kendall_tau_b(x: list[float], y: list[float]) -> float:
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denominator if denominator else 0.0


def per_class_tau(rows, measured) -> dict[str, tuple[int, int, float]]:
    """Op family -> (ops, distinct predicted times, Kendall tau within the family).
    Ranks pooled over all ops mostly separate the families (a matmul against a
    view); within one family the model has to order ops by their shapes."""
    by_class: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row.op in measured:
            by_class.setdefault(row.family, []).append((row.time, measured[row.op]))
    return {
        name: (len(pairs), len({p for p, _ in pairs}), kendall_tau_b(*map(list, zip(*pairs))))
        for name, pairs in sorted(by_class.items(), key=lambda item: -len(item[1]))
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hardware", default="cpu")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--forwards", type=int, default=3, help="timed forwards after each pass")
    args = parser.parse_args()

    import plait
    from plait.frontend import hf
    from plait.hardware import load
    from plait.runtime.profile import profile_ops
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    inputs = hf.example_inputs(model, 1, args.seq)
    compiled = _compile(model, plait.DEFAULT_PIPELINE)
    hardware = load(args.hardware)
    predicted = compiled.estimate(hardware, values={"batch": 1, "seq": args.seq})

    passes, runs = [], []
    with torch.inference_mode():
        for _ in range(3):
            compiled(*inputs)
    for _ in range(args.passes):  # forwards spread between the passes, like the op timings
        passes.append(profile_ops(compiled.program, list(inputs), repeats=args.repeats))
        with torch.inference_mode():
            for _ in range(args.forwards):
                start = time.perf_counter()
                compiled(*inputs)
                runs.append(time.perf_counter() - start)
    measured = {op: statistics.median(p[op] for p in passes) for op in passes[0]}
    total_measured = statistics.median(runs)

    pairs = [(row.time, measured[row.op]) for row in predicted.ops if row.op in measured]
    tau = kendall_tau_b([p for p, _ in pairs], [m for _, m in pairs])
    total_predicted = predicted.schedule.step_time
    error = total_predicted / total_measured - 1
    print(
        f"small Llama (hidden 512, 4 layers), batch 1, seq {args.seq}, hardware file {hardware.name} "
        f"({hardware.description}), torch threads {torch.get_num_threads()}"
    )
    print(f"ops compared: {len(pairs)}")
    print(f"Kendall tau (predicted vs measured per-op time): {tau:.3f}  (goal >= 0.8)")
    print(f"\n{'op class':<14} {'ops':>4} {'distinct predictions':>21} {'tau':>7}")
    for name, (ops, distinct, class_tau) in per_class_tau(predicted.ops, measured).items():
        goal = "  (goal >= 0.6)" if name in ("elementwise", "reshape") else ""
        shown = f"{class_tau:.3f}" if distinct > 1 else "-"  # one prediction ranks nothing
        print(f"{name:<14} {ops:>4} {distinct:>21} {shown:>7}{goal}")
    print(
        f"forward: predicted {total_predicted * 1e3:.3f} ms, measured {total_measured * 1e3:.3f} ms, "
        f"error {error:+.1%}  (goal within +-25%)"
    )
    slowest = sorted((r for r in predicted.ops if r.op in measured), key=lambda r: -measured[r.op])[
        :8
    ]
    print(f"\n{'op':<48} {'predicted us':>13} {'measured us':>12}")
    for row in slowest:
        name = f"{row.family} {row.module}"[:48]
        print(f"{name:<48} {row.time * 1e6:>13.1f} {measured[row.op] * 1e6:>12.1f}")
    fused_forward(model, inputs, hardware, compiled, total_predicted, args.passes * args.forwards)


def fused_forward(model, inputs, hardware, plain, unfused: float, rounds: int) -> None:
    """The same forward through `fuse` (Inductor): predicted with fusion groups
    priced as one kernel each, and as if each op ran alone (`unfused`, the
    prediction for `plain`), against its measured median, with the unfused
    program `plain` timed in the same rounds beside it."""
    import plait

    compiled = _compile(model, f"{plait.DEFAULT_PIPELINE},fuse")
    predicted = compiled.estimate(hardware, values={"batch": 1, "seq": inputs[0].shape[1]})
    times: dict[str, list[float]] = {"fused": [], "unfused": []}
    with torch.inference_mode():
        for program in (compiled, plain):
            for _ in range(3):  # (the first call compiles)
                program(*inputs)
        for _ in range(rounds):
            for name, program in (("fused", compiled), ("unfused", plain)):
                start = time.perf_counter()
                program(*inputs)
                times[name].append(time.perf_counter() - start)
    measured = {name: statistics.median(runs) for name, runs in times.items()}
    fused = predicted.schedule.step_time
    print(
        f"\nfused forward (fuse, Inductor): measured {measured['fused'] * 1e3:.3f} ms "
        f"(unfused beside it {measured['unfused'] * 1e3:.3f} ms); predicted with fusion "
        f"{fused * 1e3:.3f} ms ({fused / measured['fused'] - 1:+.1%}), op by op "
        f"{unfused * 1e3:.3f} ms ({unfused / measured['fused'] - 1:+.1%}); fused / unfused: "
        f"predicted {fused / unfused:.3f}, measured {measured['fused'] / measured['unfused']:.3f}"
    )


def _compile(model, pipeline: str):
    """The Llama's forward for any batch and up to 1024 positions."""
    import plait
    from plait.frontend import hf

    return plait.compile(
        hf.wrap(model),
        hf.example_inputs(model, 2, 16),
        dynamic_shapes=hf.dynamic_shapes(max_seq=1024),
        pipeline=pipeline,
    )


if __name__ == "__main__":
    main()
