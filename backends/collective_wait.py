"""Wait for a collective on gloo so that its tensors die where the program says.

gloo runs a collective on a worker thread of its process group, and that
thread marks the work complete (which returns `wait_tensor`) before it drops
its own reference to the work, which holds the tensors it was given. If the
thread is descheduled in between, the program can go on, read the result and
drop it while the worker still holds it: its storage is freed later, on the
worker thread, at a moment that depends on scheduling, and a step's peak memory
is no longer a function of the program. So the program hands each collective
a tensor of its own (`detach`: the same storage, a handle no one else holds,
whose views would count against it) and, after waiting, waits also until the
worker has let go of it and of the result: from then on the program alone
decides when their storage dies, as the cost model's lifetimes assume.
"""

from __future__ import annotations

import time

import torch

RELEASE_TIMEOUT_S = 1.0  # never hang on a worker that keeps a tensor (freed later, then)


def wait_released(pending: torch.Tensor, handed: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """`pending`'s result, once the worker holds neither it nor `handed` (the
    tensor the collective was given; or the views of the result that several
    were, one wait taking every collective on a storage): each then has one
    reference, the program's (and the result one more per view: its base)."""
    result = torch.ops._c10d_functional.wait_tensor.default(pending)
    views = handed if isinstance(handed, list) else []
    held = [(result, 1 + len(views)), *((t, 1) for t in views or [handed])]
    deadline = None
    while any(t._use_count() > count for t, count in held):
        deadline = deadline or time.monotonic() + RELEASE_TIMEOUT_S
        if time.monotonic() > deadline:
            break
        time.sleep(0)  # (the worker needs the CPU for a moment)
    return result
