"""A training step's memory, measured and predicted.

Measured (plait.runtime.memory, `trainer.memory(measured=True)`): checked on
code whose allocations are counted by hand, and against the CPU allocator's
own accounting (torch.profiler's allocation events) on plait's step and on
eager autograd's. Predicted (`plait estimate`): the peak and its kinds against
the measured ones. Sharded steps (tp:2, dp:2) are checked in
test_training_parallel.py, on the runs its fixtures already make."""

from __future__ import annotations

import plait
import pytest
import torch
from plait.cost.estimate import Target, estimate
from plait.cost.estimate_report import summary
from plait.frontend.training import TrainingError
from plait.hardware import load
from plait.ir.training import (
    BACKWARD,
    FORWARD,
    INPUTS,
    OPTIMIZER,
    OPTIMIZER_STATE,
    PARAMETERS,
    SAVED,
    TEMPORARY,
)
from plait.runtime.memory import PEAK, Storages
from test_training import _hf_model
from test_training_parallel import _batches

# predicted vs measured: the peak and each kind alive at it, as a share of the
# peak. The issue asks for 10%; the estimate's model of what is alive is the
# program's own, so it misses by bytes (a batch's micro-batches share one
# storage), and 1% catches a model that drifts from the generated code.
PREDICTION_TOLERANCE = 0.01


def _allocator_peak(step) -> int:
    """Bytes the CPU allocator had allocated at most while `step()` ran,
    above what it held before (from the profiler's allocation events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append(event)
    events.sort(key=lambda e: e.start_time_ns)
    first = events[0].extra_fields
    before = first.total_allocated - first.alloc_size  # (the allocator's running total)
    return max(e.extra_fields.total_allocated for e in events) - before


def test_storages_count_allocations_once_by_hand():
    """1 KiB tensors: a view and an in-place update allocate nothing; a
    freed tensor stops counting; the peak is the most alive at once."""
    x = torch.ones(256)
    storages = Storages()
    storages.add(x.untyped_storage(), INPUTS)  # held before
    with storages:
        a = x * x  # +1 KiB
        v = a.view(16, 16)  # a view: nothing
        v.add_(x.view(16, 16))  # in place: nothing
        b = a + x  # +1 KiB: 3 KiB alive, the peak
        del a, v  # -1 KiB
        c = b.sum()  # +4 B
        d = torch.cat([b, b])  # +2 KiB: 4 KiB + 4 B, a new peak
        del d
    storages.close()
    assert storages.peak == 4 * 1024 + 4
    assert storages.current == 2 * 1024 + 4
    assert storages.at_peak[INPUTS] == 1024 and storages.at_peak[TEMPORARY] == 3 * 1024 + 4
    assert c.item() == 256 * 3


@pytest.fixture(scope="module")
def measured():
    """A 1-layer Llama's step on one device, measured, under the profiler too."""
    model, batches = _hf_model("llama", num_hidden_layers=1), _batches(2)
    trainer = plait.compile_training(model, batches[0], optimizer="adamw", lr=1e-3)
    with pytest.raises(TrainingError, match="measure_memory = True"):
        trainer.memory(measured=True)  # off by default
    trainer.step(*batches[0])
    with pytest.raises(TrainingError, match="measure_memory = True"):
        trainer.memory(measured=True)  # (a step measures nothing unless asked)
    trainer.measure_memory = True
    allocated = _allocator_peak(lambda: trainer.step(*batches[1]))
    return trainer, trainer.memory(measured=True), allocated


def test_a_measured_step_matches_the_allocators_accounting(measured):
    trainer, record, allocated = measured
    # what the program holds: its state and weights (rotary's inv_freq)
    held = sum(  # (the shared dict also holds each state's checkpoint layout)
        t.untyped_storage().nbytes()
        for t in trainer._shared.values()
        if isinstance(t, torch.Tensor)
    )
    assert record[PARAMETERS] + record[OPTIMIZER_STATE] == held
    assert record[OPTIMIZER_STATE] == trainer.memory()[OPTIMIZER_STATE]
    # the allocator saw what the step allocated: the peak less the state and the batch
    batch = sum(t.untyped_storage().nbytes() for t in _batches(2)[1])
    lr = 8  # (allocated inside the step, an input of the program)
    allocated_here = record[PEAK] - record[PARAMETERS] - record[OPTIMIZER_STATE] - batch
    assert allocated_here == allocated
    assert record[PEAK] == sum(v for k, v in record.items() if k != PEAK)
    assert record[INPUTS] == batch + lr and record[SAVED] > 0 and record[TEMPORARY] > 0


def test_the_tool_measures_eager_autograd_as_the_allocator_does():
    """The same tool on torch's own eager step (forward, backward, AdamW)."""
    model, batches = _hf_model("llama", num_hidden_layers=1), _batches(2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch):
        ids, mask, labels = batch
        model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        optimizer.step()

    step(batches[0])
    optimizer.zero_grad()  # (frees the gradients, before measuring)
    storages = Storages()
    moments = [t for s in optimizer.state.values() for t in s.values()]
    for tensor in [*model.parameters(), *model.buffers(), *moments, *batches[1]]:
        storages.add(tensor.untyped_storage(), PARAMETERS)
    held = storages.current

    def measured_step():
        with storages:
            step(batches[1])

    allocated = _allocator_peak(measured_step)
    storages.close()
    assert storages.peak - held == allocated
    assert allocated > sum(p.nbytes for p in model.parameters())  # (the gradients, and more)


def test_the_predicted_peak_is_the_measured_one(measured):
    """A 1-layer Llama on one device: the estimate's peak and its kinds."""
    trainer, record, _ = measured
    check_prediction(predict(trainer), record)


def predict(trainer: plait.Trainer):
    """The estimate of the step's function that needs the most memory (with
    accumulation, a step runs @accumulate, then @train_step)."""
    target = Target(load("h100-sxm"))
    estimates = [estimate(trainer.module, target, f) for f in trainer.functions]
    return max(estimates, key=lambda e: e.schedule.peak_memory)


def check_prediction(predicted, record: dict[str, int]) -> None:
    """The estimate's peak and its kinds are the measured ones."""
    peak = predicted.schedule.peak_memory
    assert abs(peak - record[PEAK]) <= PREDICTION_TOLERANCE * record[PEAK], (peak, record)
    for kind, size in predicted.peak_kinds.items():
        assert abs(size - record[kind]) <= PREDICTION_TOLERANCE * record[PEAK], (kind, record)


def test_a_training_steps_estimate_prices_backward_and_the_optimizer(measured):
    trainer, _, _ = measured
    predicted = estimate(trainer.module, Target(load("h100-sxm")))
    times = predicted.phase_times
    assert set(times) == {FORWARD, BACKWARD, OPTIMIZER}
    # backward: about twice the forward's work; the optimizer: AdamW's element-wise rows
    assert times[BACKWARD] > times[FORWARD] > 0 and times[OPTIMIZER] > 0
    assert predicted.schedule.step_time >= sum(times.values()) * (1 - 1e-9)
    rows = dict(summary(predicted))
    assert "saved activations" in rows["peak memory by kind"]
    assert "optimizer" in rows["step phases"]


def test_solve_ilp_on_a_training_step_prices_the_step_it_emits():
    """shard{solve=ilp} on a tp:2 step (compiled only): the plan is the step
    rules' (Megatron's, state split with its parameter), and plait.sharding
    gives the cost model's time for that plan, backward and optimizer
    included; memory bounds the state a device holds."""
    import re

    from plait.frontend.training import TrainingSpec, capture_training
    from plait.ir.attrs import SHARDING_ATTR
    from plait.ir.training import TRAIN_STEP, step_memory
    from plait.passes.manager import PassManager
    from plait.passes.shard.ilp import SolveError
    from plait.training import _function
    from test_training_parallel import _parameter_bytes

    model, batch = _hf_model("llama", num_hidden_layers=1), _batches(1)[0]
    captured = capture_training(
        model, batch, TrainingSpec("adamw", {}, 1, None, "fp32"), None, None
    )
    pipeline = "canonicalize,cse,dce,shard{mesh=tp:2,solve=ilp,hardware=h100-sxm%s}"
    module = captured.module.clone()
    with pytest.warns(UserWarning, match="sharded by the step rules"):
        PassManager.parse(pipeline % "").run(module, captured.weights)
    memory = step_memory(_function(module, TRAIN_STEP))
    assert memory[PARAMETERS] == _parameter_bytes(model, tp=2)
    assert memory[OPTIMIZER_STATE] == 2 * memory[PARAMETERS] + 8  # moments split alike
    record = module.attributes[SHARDING_ATTR].data
    predicted = float(re.search(r"predicted ([\d.e+-]+) s/step", record)[1])
    step = estimate(module, Target(load("h100-sxm")))
    assert predicted == pytest.approx(step.schedule.step_time, rel=1e-5)
    forward = step.phase_times[FORWARD]
    assert step.phase_times[BACKWARD] > forward and predicted > 2 * forward
    held = float(re.search(r"weights and state ([\d.e+-]+) B/device", record)[1])
    too_small = PassManager.parse(pipeline % f",memory={held / 2:g}")
    with pytest.raises(SolveError, match="below what the training step's weights and state"):
        too_small.run(captured.module.clone(), captured.weights)
