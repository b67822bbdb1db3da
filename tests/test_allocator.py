"""A process that runs training steps reuses freed memory (runtime/allocator.py).

Measured by page faults, not time: a 64 MiB tensor allocated again after
the last one was freed faults in its pages anew (16k faults of 4 KiB) unless
malloc kept the freed block."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import resource, torch, plait

    model = torch.nn.Linear(4, 2)
    trainer = plait.compile_training(
        model, (torch.randn(3, 4),), loss_fn=lambda out, x: out.square().mean()
    )
    trainer.step(torch.randn(3, 4))
    faults = []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 << 20)  # 64 MiB, freed at once
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sorted(faults)[6])  # the median: a small block may split a freed one
    """
)


def _faults(keep: str) -> int:
    env = {**os.environ, "PLAIT_KEEP_FREED_MEMORY": keep}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_a_training_process_reuses_freed_memory():
    pages = (64 << 20) // 4096
    assert _faults("0") > pages // 2  # malloc returned the block: every page faults again
    assert _faults("1") < pages // 16  # the step's process kept it
