"""plaittest::nap(x, seconds): x, after sleeping `seconds` (a rank busy with a
long call, without using a CPU). Worker ranks import no test code, so tests
put this folder on PYTHONPATH, and Python imports it at startup, as a library
registers its ops. With $PLAIT_TEST_NAPS set, a rank entering the op writes
its pid to $PLAIT_TEST_NAPS/rank<R>: the test knows it is mid-call. With
$PLAIT_TEST_LATE_RANK=R only rank R naps: its peers wait for it in the next
collective."""

import os
import time

import torch


@torch.library.custom_op("plaittest::nap", mutates_args=())
def nap(x: torch.Tensor, seconds: torch.Tensor) -> torch.Tensor:
    folder = os.environ.get("PLAIT_TEST_NAPS")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if os.environ.get("PLAIT_TEST_LATE_RANK", str(rank)) != str(rank):
        return x.clone()
    if folder:
        with open(os.path.join(folder, f"rank{rank}"), "w") as f:
            f.write(str(os.getpid()))
    time.sleep(float(seconds))
    return x.clone()


@nap.register_fake
def _(x, seconds):
    return torch.empty_like(x)
