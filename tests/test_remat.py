"""remat{budget}: activation rematerialization on a training step.

A plan trains as eager torch + AdamW does; the step's measured saved
activations stay within the budget (and below the step without remat); the
estimate predicts the measured peak; the integer program's plan is the
brute-force optimum on a small graph; its size does not grow with depth."""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter

import plait
import pytest
import torch
from plait.cost.estimate import Target, estimate
from plait.cost.estimate_report import summary
from plait.frontend.training import TrainingSpec, capture_training
from plait.hardware import load
from plait.ir.attrs import REMAT_ATTR
from plait.ir.text import parse_module, print_module
from plait.ir.training import SAVED, TRAIN_STEP
from plait.passes.manager import PassManager
from plait.passes.memory.liveness import value_sizes
from plait.passes.memory.remat_graph import step_graph
from plait.passes.memory.remat_solve import RematError, solve
from plait.runtime.memory import PEAK
from plait.training import _function
from test_training import _check_run, _eager, _hf_model, _lm_loss
from test_training_memory import check_prediction, predict
from test_training_parallel import _batches

BASE = "canonicalize,cse,dce"
STEPS = 3


def _adamw(parameters):
    return torch.optim.AdamW(parameters, lr=1e-3)


def _measured(pipeline: str, batches):
    """A 2-layer Llama's steps under `pipeline`: (trainer, the last step's record)."""
    model = _hf_model("llama", num_hidden_layers=2)
    trainer = plait.compile_training(model, batches[0], lr=1e-3, pipeline=pipeline)
    trainer.measure_memory = True
    losses, _, reference = _eager(model, batches, _lm_loss, _adamw)
    _check_run(trainer, batches, losses, reference)  # losses and final parameters, 1e-5
    return trainer, trainer.memory(measured=True)


@pytest.fixture(scope="module")
def without_remat():
    return _measured(BASE, _batches(STEPS))[1]


ATTENTION = '"aten::_scaled_dot_product_flash_attention_for_cpu"'


# bytes: about half of what the 2-layer step saves (812808 B), and 5% of it,
# where even attention is recomputed
@pytest.mark.parametrize("budget,attention", [(400_000, 2), (40_000, 4)])
def test_a_remat_plan_trains_as_eager_within_its_budget(budget, attention, without_remat):
    trainer, record = _measured(f"{BASE},remat{{budget={budget}}}", _batches(STEPS))
    choice = trainer.module.attributes[REMAT_ATTR].data
    assert f"budget {budget} B" in choice and "optimal" in choice
    assert 0 < record[SAVED] <= budget < without_remat[SAVED]
    predicted = predict(trainer)
    check_prediction(predicted, record)  # the peak and its kinds, within 1%
    assert dict(summary(predicted))["rematerialization"] == choice  # as `plait estimate` shows
    text = print_module(trainer.module)  # the plan prints and parses back
    assert print_module(parse_module(text)) == text
    assert text.count(ATTENTION) == attention  # (2 layers' forward, and clones)


def test_remat_plans_each_function_of_an_accumulating_step():
    """With gradient accumulation the step runs @accumulate, then @train_step:
    both are planned, and train as eager does."""
    model, batches = _hf_model("llama", num_hidden_layers=1), _batches(2)
    trainer = plait.compile_training(
        model, batches[0], lr=1e-3, accumulation=2, pipeline=f"{BASE},remat{{budget=0.5}}"
    )
    choice = trainer.module.attributes[REMAT_ATTR].data
    assert choice.count("recomputes") == 2 and "@accumulate" in choice
    losses, _, reference = _eager(model, batches, _lm_loss, _adamw, accumulation=2)
    _check_run(trainer, batches, losses, reference)


def test_remat_after_tp_sharding_trains_as_eager(tmp_path):
    """shard{mesh=tp:2},remat on 2 gloo ranks: each rank's plan keeps its
    saved activations within the budget, and trains as eager does."""
    from test_training_parallel import ADAMW, _check_parity, _llama, _run

    run = _run(_llama(2), "mesh=tp:2", ADAMW, tmp_path, then=",remat{budget=0.5}")
    _check_parity(run)
    budget = int(re.search(r"budget (\d+) B", run.trainer.module.attributes[REMAT_ATTR].data)[1])
    predicted = predict(run.trainer).schedule.peak_memory
    for record in run.measured:
        assert 0 < record[SAVED] <= budget
        # (a rank's peak moves by a buffer or two with when gloo's thread frees)
        assert abs(predicted - record[PEAK]) <= 0.1 * record[PEAK]


def _graph(module):
    fn = _function(module, TRAIN_STEP)
    report = estimate(module, Target(load("cpu")), TRAIN_STEP)
    times = {row.op: row.time for row in report.ops}
    return step_graph(fn, times, value_sizes(fn, {}), report.schedule.bases)


def _captured(model, batch):
    spec = TrainingSpec("adamw", {}, 1, None, "fp32")
    captured = capture_training(model, batch, spec, None, None)
    PassManager.parse(BASE).run(captured.module, captured.weights)
    return captured.module


class Branchy(torch.nn.Module):
    """Values backward reads through several paths: a small graph to enumerate."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x, y):
        h = self.fc1(x)
        a = torch.sin(h)
        b = a * torch.cos(h) + torch.exp(a)
        return torch.nn.functional.mse_loss(self.fc2(b), y)


def _cost(graph, stored):
    """(saved bytes, recompute seconds) of storing `stored`, or None where
    that is no plan: what is not stored but read after the loss is
    recomputed from stored nodes, recursively; a view stored holds its
    base's memory."""
    if not graph.returned <= stored:
        return None
    recomputed, pending = set(), [n for n in graph.saved if n not in stored]
    while pending:
        node = pending.pop()
        if node not in recomputed:
            if not graph.recomputable[node]:
                return None
            recomputed.add(node)
            pending.extend(s for s in graph.inputs[node] if s not in stored)
    read = {n for n in graph.saved if n in stored}
    read |= {s for n in recomputed for s in graph.inputs[n] if s in stored}
    held = {graph.view_of.get(n, n) for n in read}
    return sum(graph.bytes[n] for n in held), sum(graph.time[n] for n in recomputed)


def _every_plan(graph):
    """(saved bytes, recompute seconds) of every set of nodes one may store."""
    for bits in itertools.product((0, 1), repeat=len(graph.nodes)):
        cost = _cost(graph, {n for n, b in zip(graph.nodes, bits) if b})
        if cost is not None:
            yield cost


def _brute_force(graph, budget):
    """The least recompute time of any plan within `budget`."""
    return min((t for b, t in _every_plan(graph) if b <= budget), default=None)


def test_the_plan_is_the_brute_force_optimum_on_a_small_graph():
    x, y = torch.randn(4, 8), torch.randn(4, 4)
    graph = _graph(_captured(Branchy(), (x, y)))
    assert 8 <= len(graph.nodes) <= 16 and len(graph.saved) >= 4
    everything = solve(graph, float("inf")).saved_bytes
    costs, infeasible = [], 0
    for share in (1.0, 0.8, 0.6, 0.4, 0.2, 0.05, 0.001):
        budget = share * everything
        expected = _brute_force(graph, budget)
        if expected is None:  # the error states the least bytes of any plan
            least = min(b for b, _ in _every_plan(graph))
            with pytest.raises(RematError, match=f"the least any plan stores is {least} B"):
                solve(graph, budget)
            infeasible += 1
            continue
        plan = solve(graph, budget)
        assert plan.saved_bytes <= budget and plan.status == "optimal"
        assert plan.time == pytest.approx(expected, rel=1e-6, abs=1e-12), share
        costs.append(plan.time)
    assert costs[0] == 0 and len(set(costs)) >= 3  # the budgets ask for different plans
    assert infeasible == 1


@pytest.fixture(scope="module")
def deep():
    return _graph(_captured(_hf_model("llama", num_hidden_layers=3), _batches(1)[0]))


def test_repeated_layers_share_one_choice_so_depth_does_not_grow_the_program(deep):
    shallow = _graph(_captured(_hf_model("llama", num_hidden_layers=1), _batches(1)[0]))
    assert len(deep.nodes) > 2 * len(shallow.nodes)
    everything = solve(deep, float("inf")).saved_bytes
    start = time.perf_counter()
    plan = solve(deep, everything / 3)
    assert time.perf_counter() - start < 1.0
    assert plan.groups == solve(shallow, float("inf")).groups
    assert plan.status == "optimal" and plan.saved_bytes <= everything / 3
    # every layer recomputes the same ops
    layers = {}
    for node in plan.recomputed:
        layers.setdefault(deep.group[node], []).append(node)
    shared = [nodes for key, nodes in layers.items() if key[0] == "layer" and len(nodes) > 1]
    assert shared and all(len(nodes) >= 3 for nodes in shared)


def test_the_plan_beats_selective_checkpointing_at_its_memory(deep):
    """torch's selective activation checkpointing policy (store what matrix
    products and attention compute, recompute the rest): the integer
    program, given the bytes that policy stores, recomputes in less time."""
    expensive = {
        n
        for n in deep.nodes
        if n.name == "plait.matmul" or "attention" in getattr(n, "target_name", "")
    }
    stored = expensive | {n for n in deep.nodes if not deep.recomputable[n]} | deep.returned
    policy_bytes, policy_time = _cost(deep, stored)
    plan = solve(deep, policy_bytes)
    assert plan.saved_bytes <= policy_bytes and plan.time < policy_time


def test_a_budget_no_plan_meets_names_the_least_reachable():
    batch = (torch.randn(4, 8), torch.randn(4, 4))
    with pytest.raises(plait.PlaitError, match=r"remat\{budget=2\} on @train_step: .* is 4 B"):
        plait.compile_training(Branchy(), batch, pipeline=f"{BASE},remat{{budget=2}}")


def test_plait_opt_rematerializes_a_step_dump(tmp_path):
    """An IR dump of a step through `plait opt --pipeline remat{...}`: the
    recomputed ops are clones in backward, reading what is stored, and the
    result prints, parses back and says what remat chose."""
    from plait import cli

    module = _captured(Branchy(), (torch.randn(4, 8), torch.randn(4, 4)))
    source, out = tmp_path / "step.mlir", tmp_path / "remat.mlir"
    source.write_text(print_module(module))
    assert cli.main(["opt", str(source), "--pipeline", "remat{budget=300}", "-o", str(out)]) == 0
    text = out.read_text()
    assert print_module(parse_module(text)) == text
    recomputed = int(re.search(r"saved 1092 B -> \d+ B, recomputes (\d+) ops", text)[1])
    before, after = _backward_calls(module), _backward_calls(parse_module(text))
    clones = after - before  # forward ops cloned into backward
    assert sum(clones.values()) == recomputed > 0
    assert set(clones) <= set(_forward_calls(module))


def _calls(module):
    ops = list(_function(module, TRAIN_STEP).body.blocks.first.ops)
    seed = next(
        i for i, op in enumerate(ops) if getattr(op, "target_name", "") == "aten::ones_like"
    )
    return ops, seed


def _backward_calls(module) -> Counter:
    ops, seed = _calls(module)
    return Counter(op.target_name for op in ops[seed:] if hasattr(op, "target_name"))


def _forward_calls(module) -> Counter:
    ops, seed = _calls(module)
    return Counter(op.target_name for op in ops[:seed] if hasattr(op, "target_name"))


def test_remat_needs_a_training_step():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(plait.PlaitError, match="remat applies to a training step"):
        plait.compile(model, (torch.ones(2, 4),), pipeline="remat")


class Dropped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x, y):
        h = torch.nn.functional.dropout(torch.tanh(self.fc1(x)), 0.5, training=True)
        return torch.nn.functional.mse_loss(self.fc2(torch.sin(h)), y)


def test_random_ops_are_stored_never_recomputed():
    """A dropout's mask is drawn once: under a budget that recomputes what
    reads it, the dropout's result is stored, and the step equals the one
    without remat on the same random numbers."""
    batch = (torch.randn(4, 8), torch.randn(4, 4))
    results = []
    for pipeline in (BASE, f"{BASE},remat{{budget=400}}"):
        trainer = plait.compile_training(Dropped(), batch, pipeline=pipeline)
        torch.manual_seed(1)
        losses = [trainer.step(*batch) for _ in range(2)]
        results.append((losses, trainer.state_dict(), print_module(trainer.module)))
    (losses, state, _), (remat_losses, remat_state, text) = results
    assert text.count('"aten::native_dropout"') == 1 and text.count('"aten::sin"') == 2
    assert "recomputes 0 ops" not in text
    torch.testing.assert_close(remat_losses, losses, rtol=0, atol=0)
    torch.testing.assert_close(remat_state, state, rtol=0, atol=0)
