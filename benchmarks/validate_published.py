"""Validation: the cost model against every published decode measurement in
benchmarks/published/decode_points.json (each point carries its source URL).

    python benchmarks/validate_published.py            # all points
    python benchmarks/validate_published.py --models llama-3-8b

Each point is a generation run: a prompt of P tokens, then N new tokens, at
batch B on TP ranks. Published throughput is B*N / (prefill + N-1 decode
steps), so the prediction is the same: the cost model's prefill of the prompt
plus N-1 decode steps whose attention reads the mean context P + N/2. Models
are captured on `meta` in bf16 with a symbolic batch, sharded with the
Megatron rules (`shard{mesh=tp:T}`), and for the ladder column rewritten by
the `ladder` pass. The hardware files are used as they are: nothing here is
fitted to these points.

Printed per point: per-token time (1 / tokens/s, prefill included) predicted
vs measured; the decode step alone where the authors' log gives the decode
latency; and the ladder speedup (ladder tokens/s over standard). Then the
median and worst errors per source and over all points.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

DATA = Path(__file__).parent / "published" / "decode_points.json"

# Hugging Face configurations of the published models (public model cards)
CONFIGS = {
    "llama-3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    ),
    "llama-3-70b": dict(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
    ),
    "llama-2-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    ),
    "llama-2-70b": dict(
        vocab_size=32000, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
    ),
}  # fmt: skip


class Predictor:
    """Captured programs per (model, tokens per sequence), sharded per TP degree."""

    def __init__(self, fused: bool = False):
        self.captured, self.plans = {}, {}
        self.fused = fused

    def _capture(self, model_name: str, seq: int):
        key = (model_name, seq)
        if key not in self.captured:
            from plait.frontend import hf
            from plait.frontend.capture import capture
            from plait.frontend.importer import import_program
            from transformers import LlamaConfig, LlamaForCausalLM

            config = LlamaConfig(**CONFIGS[model_name], max_position_embeddings=8192)
            with torch.device("meta"):
                model = LlamaForCausalLM(config).to(torch.bfloat16)
            shapes = hf.dynamic_shapes(max_batch=64, seq=False)
            program = capture(hf.wrap(model), hf.example_inputs(model, 2, seq), shapes)
            self.captured[key] = import_program(program)
        return self.captured[key]

    def plan(self, model_name: str, seq: int, tp: int, ladder: bool):
        key = (model_name, seq, tp, ladder)
        if key not in self.plans:
            from plait.passes.manager import PassManager

            module, weights = self._capture(model_name, seq)
            module = module.clone()
            pipeline = "canonicalize,cse,dce" + (f",shard{{mesh=tp:{tp}}},dce" if tp > 1 else "")
            if ladder and tp > 1:
                pipeline += ",ladder"
            if self.fused:
                pipeline += ",fuse"
            PassManager.parse(pipeline).run(module, weights)
            self.plans[key] = module
        return self.plans[key]

    def tokens_per_s(self, point: dict, ladder: bool) -> tuple[float, float]:
        """(predicted tokens/s of the whole run, predicted decode step in s)."""
        from plait.cost.estimate import Target, estimate
        from plait.hardware import load

        hardware = load(point["hardware"])
        batch, prompt, new = point["batch"], point["prompt"], point["new_tokens"]
        values = {"batch": batch}
        model, tp = point["model"], point["tp"]
        prefill = estimate(self.plan(model, prompt, tp, ladder), Target(hardware, values=values))
        decode = estimate(
            self.plan(model, 1, tp, ladder),
            Target(hardware, values=values, context=prompt + new // 2),
        )
        step = decode.schedule.step_time
        total = prefill.schedule.step_time + (new - 1) * step
        return batch * new / total, step


def _error(predicted: float, measured: float) -> float:
    return predicted / measured - 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="", help="comma-separated subset of models")
    parser.add_argument(
        "--fused",
        action="store_true",
        help="price the programs as compiled ones (`fuse`: fusion groups), as the sources ran them",
    )
    args = parser.parse_args()
    data = json.loads(DATA.read_text())
    points = data["points"]
    if args.models:
        points = [p for p in points if p["model"] in args.models.split(",")]
    predictor = Predictor(args.fused)
    rows = []
    print(
        f"{'source':<24} {'model':<12} {'hardware':<16} {'B':>3} {'TP':>2} "
        f"{'ms/token pred/meas':>19} {'err':>7} {'step ms pred/meas':>18} {'err':>7} "
        f"{'ladder pred/meas':>17} {'diff':>6}"
    )
    for point in points:
        batch = point["batch"]
        standard, step = predictor.tokens_per_s(point, ladder=False)
        row = {"source": point["source"], "token": _error(point["standard_tokens_per_s"], standard)}
        # per-token time error: (1/pred)/(1/meas) - 1 = meas/pred - 1
        token_cell = (
            f"{batch / standard * 1e3:>8.3f}/{batch / point['standard_tokens_per_s'] * 1e3:<8.3f}"
        )
        step_cell, step_err = f"{'':>18}", f"{'':>7}"
        if point.get("standard_decode_s"):
            measured_step = point["standard_decode_s"] / (point["new_tokens"] - 1)
            row["step"] = _error(step, measured_step)
            step_cell = f"{step * 1e3:>8.3f}/{measured_step * 1e3:<8.3f}"
            step_err = f"{row['step']:>+7.1%}"
        ladder_cell, ladder_diff = f"{'':>17}", f"{'':>6}"
        if point.get("ladder_tokens_per_s"):
            laddered, _ = predictor.tokens_per_s(point, ladder=True)
            predicted_speedup = laddered / standard
            measured_speedup = point["ladder_tokens_per_s"] / point["standard_tokens_per_s"]
            row["ladder"] = predicted_speedup - measured_speedup
            ladder_cell = f"{f'{predicted_speedup:.2f}x':>8}/{f'{measured_speedup:.2f}x':<8}"
            ladder_diff = f"{row['ladder']:>+6.2f}"
        rows.append(row)
        print(
            f"{point['source']:<24} {point['model']:<12} {point['hardware']:<16} {batch:>3} "
            f"{point['tp']:>2} {token_cell} {row['token']:>+7.1%} {step_cell} {step_err} "
            f"{ladder_cell} {ladder_diff}",
            flush=True,
        )
    print(
        "\nerrors (per-token time, decode step: predicted/measured - 1; ladder: predicted - measured)"
    )
    groups = {"all points": rows}
    for source in dict.fromkeys(r["source"] for r in rows):
        groups[source] = [r for r in rows if r["source"] == source]
    for name, group in groups.items():
        cells = []
        for key, fmt in (("token", "{:+.1%}"), ("step", "{:+.1%}"), ("ladder", "{:+.2f}")):
            values = [r[key] for r in group if key in r]
            if values:
                median = statistics.median(abs(v) for v in values)
                worst = max(values, key=abs)
                within = sum(abs(v) <= (0.1 if key == "ladder" else 0.15) for v in values)
                cells.append(
                    f"{key}: n={len(values)} median |err| {fmt.format(median).lstrip('+')}, "
                    f"worst {fmt.format(worst)}, within goal {within}/{len(values)}"
                )
        print(f"{name}:\n  " + "\n  ".join(cells))
    print("\ngoals (issue 22): per-token/step time within +-15%, ladder speedup within +-0.1")


if __name__ == "__main__":
    main()
