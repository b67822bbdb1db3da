"""Keep freed host memory for reuse, in a process that runs training steps.

A training step allocates the same large temporaries every step (gradient
buckets, the optimizer's intermediates, activations). glibc's malloc serves
a block above its mmap threshold (128 KiB, rising with use to at most
32 MiB) by mmap and returns it to the kernel on free, and gives the top of
its heap back above a trim threshold, so the next step's tensor of the same
size faults in and zeroes every page again: on a 111M Llama at dp:2 that
was 0.23 s of a 2.9 s step in the bucket `cat` alone, and the AdamW
intermediates paid it too. PyTorch's CUDA caching allocator keeps freed
blocks for the same reason; on the CPU this does it with malloc's own
settings: large blocks from the heap, which is never trimmed, so a freed
block is reused by the next step.

It changes the whole process, once, and is skipped where malloc is not
glibc's or when `PLAIT_KEEP_FREED_MEMORY=0` (the process then returns freed
memory to the system as usual, and steps run slower).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_NEVER = 2**31 - 1  # mallopt takes an int

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Serve large blocks from malloc's heap and never trim it; True when
    this process does so (now or from an earlier call)."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("PLAIT_KEEP_FREED_MEMORY", "1") == "0":
        return _done
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return _done
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # each returns 1 when glibc takes the value
    _done = bool(
        libc.mallopt(_M_MMAP_THRESHOLD, _NEVER) and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER)
    )
    return _done
