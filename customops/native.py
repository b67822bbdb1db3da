"""Build a C++ source of this package into a Python module, on first use,
with torch.utils.cpp_extension (into torch's extension cache), for the vector
units this CPU has. A machine without a compiler gets None and a warning: every
kernel built here has a torch path that does the same."""

from __future__ import annotations

import warnings
from pathlib import Path

# /proc/cpuinfo flag -> the compiler flags that use it
_VECTOR_FLAGS = {
    "avx2": ["-mavx2", "-mfma"],  # (every AVX2 CPU has FMA)
    "avx512f": ["-mavx512f"],
    "f16c": ["-mf16c"],  # float16 to float in one instruction
}


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    return {word for line in text.splitlines() if line.startswith("flags") for word in line.split()}


def build(name: str, source: str, fallback: str, extra_flags: tuple[str, ...] = ()):
    """The module built from `source` (next to this file), or None with a
    warning that says what runs instead (`fallback`)."""
    from torch.utils.cpp_extension import load

    cpu = _cpu_flags()
    flags = ["-O3", "-fopenmp-simd", *extra_flags]
    for feature, more in _VECTOR_FLAGS.items():
        if feature in cpu and (feature != "avx2" or "fma" in cpu):
            flags += more
    try:
        return load(
            name=name,
            sources=[str(Path(__file__).with_name(source))],
            extra_cflags=flags,
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers: the torch path still works
        warnings.warn(
            f"plait: the C++ kernels in {source} could not be built ({exc}); {fallback}",
            stacklevel=3,
        )
        return None
