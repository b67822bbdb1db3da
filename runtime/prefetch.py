"""Streams host-tier weights into a program ahead of their use.

A program that streams is given one by whoever builds it (api.py hands the
backend's `build_program` this class). The program calls
`self.prefetch("start", j)` where the j-th streamed weight's staging slot
frees (two ahead, see passes/memory/tiering.py) and `self.prefetch("take", j)`
just before its first use; it drops the tensor after its last use. On CPU the copy is a read on a background thread
(from the safetensors file when the weights come from one); CUDA streaming
is not built yet.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class Prefetcher(torch.nn.Module):
    def __init__(self, loaders: list[Callable[[], torch.Tensor]], names: list[str]):
        super().__init__()
        self.loaders = loaders
        self.names = names  # for messages and readers of the program
        self.pending: dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plait-prefetch")

    def forward(self, action: str, index: int):
        if action == "start":
            self.pending[index] = self.pool.submit(self.loaders[index])
            return None
        future = self.pending.pop(index, None)
        if future is None:  # not started (a call that stopped early): read it now
            return self.loaders[index]()
        return future.result()
