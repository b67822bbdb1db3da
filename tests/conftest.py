"""Shared fixtures: compiled example models, built once per test session."""

from __future__ import annotations

import plait
import pytest
import torch
from plait.examples.models import EXAMPLES

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def example():
    """example(name) -> (model, inputs, dynamic_shapes), built once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = EXAMPLES[name]()
        return cache[name]

    return get


@pytest.fixture(scope="session")
def compiled(example):
    """compiled(name, dynamic=True) -> CompiledModel of example(name), compiled once."""
    cache = {}

    def get(name: str, dynamic: bool = True):
        key = (name, dynamic)
        if key not in cache:
            model, inputs, shapes = example(name)
            cache[key] = plait.compile(model, inputs, dynamic_shapes=shapes if dynamic else None)
        return cache[key]

    return get


@pytest.fixture(autouse=True)
def no_process_group_left_behind():
    """A test that made a process group in this process must destroy it: later
    tests would take the process for a rank (and skip the worker pool)."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        pytest.fail("the test left a process group initialized in the test process")


# The slowest files first (seconds each, one process, `--durations=0` on
# 2026-12-07): the README runs the files on two xdist workers, which take
# them in collection order, so a slow file collected last would run alone
# at the end.
SLOWEST_FILES = (
    "test_zero.py",  # 200
    "test_readme.py",  # 154
    "test_shard_ilp.py",  # 128
    "test_pipeline.py",  # 126
    "test_workers.py",  # 103
    "test_training_parallel.py",  # 95
    "test_generate.py",  # 94
    "test_experts.py",  # 94
)


def pytest_collection_modifyitems(items):
    first = {name: i for i, name in enumerate(SLOWEST_FILES)}
    # (a stable sort: the other files, and each file's tests, keep their order)
    items.sort(key=lambda item: first.get(item.path.name, len(first)))
