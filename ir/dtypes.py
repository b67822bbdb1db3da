"""Element types: the IR's short names and the torch dtypes they stand for.

The IR spells element types as MLIR does (`f32`, `bf16`, `i64`, `i1`); this
table is the one place that maps them to torch's names, so the IR itself never
imports torch.
"""

# IR name -> attribute of the `torch` module
TORCH_NAMES: dict[str, str] = {
    "f64": "float64",
    "f32": "float32",
    "f16": "float16",
    "bf16": "bfloat16",
    "f8e4m3fn": "float8_e4m3fn",
    "f8e5m2": "float8_e5m2",
    "i64": "int64",
    "i32": "int32",
    "i16": "int16",
    "i8": "int8",
    "u8": "uint8",
    "u16": "uint16",
    "u32": "uint32",
    "u64": "uint64",
    "i1": "bool",
    "c64": "complex64",
    "c128": "complex128",
}

IR_NAMES: dict[str, str] = {torch_name: ir for ir, torch_name in TORCH_NAMES.items()}

# bytes per element, for memory accounting
ITEM_BYTES: dict[str, int] = {
    "f64": 8,
    "f32": 4,
    "f16": 2,
    "bf16": 2,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "i64": 8,
    "i32": 4,
    "i16": 2,
    "i8": 1,
    "u8": 1,
    "u16": 2,
    "u32": 4,
    "u64": 8,
    "i1": 1,
    "c64": 8,
    "c128": 16,
}


def is_floating(name: str) -> bool:
    return name.startswith(("f", "bf"))
