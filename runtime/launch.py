"""Running a plan on several ranks: torchrun to start them, and the setup each
rank does before loading its program.

`plait run DIR --nproc N` re-runs the same command under torchrun (PyTorch's
elastic launcher, so multi-node options pass through), with restarts off:
when a rank fails, torchrun stops the others and reports the failed rank.
Inside, each rank joins the default process group (NCCL on CUDA, gloo on
CPU) with a bounded timeout, so a rank blocked on a dead peer exits too.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("PLAIT_COLLECTIVE_TIMEOUT", "300")))


def under_launcher() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def relaunch(argv: list[str], nproc: int, launcher_args: list[str]) -> int:
    """Run `plait <argv>` on `nproc` local ranks (per node) through torchrun."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc}", "--max-restarts=0", *launcher_args,
        "-m", "plait.cli", *argv,
    ]  # fmt: skip
    return subprocess.call(command)


def join(device: str) -> str:
    """Join the process group torchrun prepared; returns this rank's device."""
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
    return device
