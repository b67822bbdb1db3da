"""Training: compile a model's whole training step, run it, checkpoint it.

    trainer = plait.compile_training(model, (ids, mask, labels), optimizer="adamw", lr=1e-3)
    loss = trainer.step(ids, mask, labels)      # forward, backward and update: one program
    trainer.state_dict()                        # the trained tensors, by the model's names
    trainer.save("ckpt/")                       # and plait.load_training("ckpt/") to resume
    trainer.measure_memory = True               # the next steps record what they allocate:
    trainer.memory(measured=True)               # peak bytes, and by kind (saved activations...)

The step is the IR function @train_step (see `plait.ir.training`); the
model's own tensors are not changed (the program updates copies).
"""

from __future__ import annotations

import json
import math
import numbers
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp

from .api import DEFAULT_PIPELINE, _imported_libraries, _in_process_group
from .backends.fx import CollectiveGroups, Program, build_program
from .frontend.training import (
    TrainingError,
    TrainingSpec,
    capture_training,
    is_hf_model,
)
from .ir.attrs import PIPELINE_AXIS, SYMBOLS_ATTR, mesh_axes
from .ir.errors import PlaitError
from .ir.ops import ParamOp, stored_weight_names
from .ir.text import print_module
from .ir.training import (
    ACCUMULATE,
    ACCUMULATOR,
    GRADIENTS,
    STATE,
    STEP_STATE,
    TRAIN_STEP,
    check_state_order,
    gradient_module,
    gradients,
    state_module,
    state_params,
    step_memory,
    value_kinds,
)
from .ir.weights import WeightStore
from .passes.manager import PassManager
from .passes.shard.pipeline_schedule import UPDATE, parse_action, pipeline_plan, stage_function
from .passes.shard.rules import DATA_AXES
from .runtime import artifact, checkpoint
from .runtime.allocator import keep_freed_memory
from .runtime.inputs import check_inputs
from .runtime.memory import PEAK, measure, pipelined_record, storage_bytes
from .runtime.prefetch import Prefetcher

Schedule = Callable[[int], float]


class NonFiniteLossError(PlaitError):
    """A step whose loss is nan or infinite: training stops there."""


def _schedule(lr) -> tuple[Schedule, float | None]:
    """A learning rate or schedule -> (step -> lr, the constant lr or None)."""
    if isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        value = _checked_lr(lr, "lr")
        return (lambda step: value), value
    if callable(lr):
        return lr, None
    raise TrainingError(
        f"lr={lr!r} must be a number or a schedule, a callable of the step count "
        "(lr=lambda step: 1e-3 * min(1.0, (step + 1) / 100))"
    )


def _checked_lr(value, where: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise TrainingError(f"{where} is {value!r}; a learning rate is a finite number >= 0")
    return float(value)


def _micro_batches(batch: Sequence, count: int) -> list[tuple]:
    """Each tensor split in `count` equal parts along dim 0."""
    if count == 1:
        return [tuple(batch)]
    for i, value in enumerate(batch):
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] % count:
            size = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise TrainingError(
                f"batch input #{i} ({size}) cannot be split in {count} micro-batches along dim "
                f"0; with accumulation={count}, every input's dim 0 must be a multiple of {count}"
            )
    return list(zip(*(value.chunk(count) for value in batch)))


def _function_names(module: ModuleOp) -> list[str]:
    return [op.sym_name.data for op in module.ops if isinstance(op, func.FuncOp)]


def _function(module: ModuleOp, name: str) -> func.FuncOp:
    return next(op for op in module.ops if isinstance(op, func.FuncOp) and op.sym_name.data == name)


class Trainer:
    """A compiled training step with its state: parameters, buffers, optimizer state.

    A step sharded over several ranks (`pipeline="...,shard{mesh=dp:2}"`) runs
    on one worker process per rank when called from one process, or on this
    rank of an initialized process group (torchrun), where every rank calls
    `step`, `state_dict` and `save` alike."""

    def __init__(
        self,
        module: ModuleOp,
        weights: WeightStore,
        spec: TrainingSpec,
        lr,
        *,
        pipeline: str,
        input_names: list[str],
        state_dict_names: dict[str, str],
        fills_mask: bool,
        device: str | torch.device = "cpu",
        source: ModuleOp | None = None,
    ):
        self.module = module
        self.weights = weights
        self.spec = spec
        self.schedule, self.constant_lr = _schedule(lr)
        self.pipeline = pipeline
        self.input_names = input_names
        self.state_dict_names = state_dict_names
        self.fills_mask = fills_mask  # a transformers model called without attention_mask
        self.device = torch.device(device)
        # the step before the pipeline ran: what a checkpoint holds, so that any
        # pipeline (any mesh) can resume from it
        self.source = source if source is not None else module
        self._shared: dict = {}  # the programs' state tensors, weights and arena
        self._programs: dict[str, Program] = {}
        self._live: set[str] = set()  # state the programs hold (their initial values let go)
        self._failed: str | None = None
        self._groups: CollectiveGroups | None = None
        self._pool = None  # worker processes, for a sharded step called in one process
        self._pool_steps: int | None = None  # steps taken on the worker ranks
        self.trusted_ops: tuple[str, ...] = _imported_libraries(module)
        self.call_timeout: float | None = None  # seconds a worker rank may stay silent
        # measure what each step allocates (trainer.memory(measured=True)); off:
        # measuring runs the step through torch.fx's Interpreter, slower
        self.measure_memory = False
        self._measured: dict[str, int] | None = None  # this rank's last measured step
        self._pool_measured = False  # a step measured on the worker ranks
        self._saving: tuple[Path, Path] | None = None  # a save not finished: (directory, staging)
        self._writing: _Background | None = None  # this rank's pieces, written by a thread
        self._source_text_cache: tuple[str, str] | None = None  # (IR, code) a checkpoint holds

    # ---- inspecting ------------------------------------------------------

    @property
    def ir(self) -> str:
        return print_module(self.module)

    @property
    def functions(self) -> list[str]:
        return _function_names(self.module)

    @property
    def mesh(self) -> dict[str, int]:
        """The device mesh the step is sharded over ({} for one device)."""
        return mesh_axes(self.module)

    @property
    def world_size(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def code(self) -> str:
        """The step's Python source (rank 0's when sharded)."""
        if self.world_size > 1:
            groups = CollectiveGroups.placeholder(self.mesh, 0)
            meta = self.weights.as_meta()
            return "\n".join(
                f"# ---- @{f} ----{build_program(self.module, meta, self.device, groups, f).code}"
                for f in self.functions
            )
        return "\n".join(f"# ---- @{f} ----{self._program(f).code}" for f in self.functions)

    @property
    def steps(self) -> int:
        """Optimizer steps taken so far (the program's step count)."""
        if self._pool_steps is not None:
            return self._pool_steps
        tensor = self._shared.get(("state", STEP_STATE))
        if tensor is None:
            tensor = self.weights.get(STEP_STATE) if STEP_STATE in self.weights else None
        return int(tensor.item()) if tensor is not None else 0

    @property
    def _entry(self) -> str:
        """The function a micro-batch enters: @train_step, or the first stage's forward."""
        return stage_function("F", 0) if pipeline_plan(self.module) else TRAIN_STEP

    def _pp_rank(self) -> int | None:
        """This rank's coordinate on the pipeline axis (None when not pipelined)."""
        if pipeline_plan(self.module) is None:
            return None
        return self._mesh_groups().coords[PIPELINE_AXIS]

    @property
    def _pooled(self) -> bool:
        return self.world_size > 1 and not _in_process_group()

    def _mesh_groups(self) -> CollectiveGroups | None:
        if self.world_size > 1 and self._groups is None:
            from .runtime.distributed import mesh_groups

            self._groups = mesh_groups(self.mesh)
        return self._groups

    def _program(self, function: str, module: ModuleOp | None = None) -> Program:
        if function not in self._programs:
            if self.device.type == "cpu":  # steps reuse the last step's freed memory
                keep_freed_memory()
            module = module if module is not None else self.module
            self._programs[function] = build_program(
                module,
                self.weights,
                self.device,
                self._mesh_groups(),
                function,
                shared=self._shared,
                prefetching=Prefetcher,
            )
            # state now lives in the program's tensors: let go of the initial values
            fn = _function(module, function)
            self._live |= {
                op.weight_name for op in fn.walk() if isinstance(op, ParamOp) and op.is_state
            }
            self.weights = self.weights.subset(
                n for n in self.weights.names() if n not in self._live
            )
        return self._programs[function]

    def prepare(self) -> None:
        """Build the step's programs now (on a rank: read its slices of the state;
        of a pipelined step, its stage's)."""
        plan, rank = pipeline_plan(self.module), self._pp_rank()
        mine = None if plan is None else _rank_functions(plan, rank)
        for function in self.functions:
            if mine is None or function in mine:
                self._program(function)

    # ---- running ---------------------------------------------------------

    def step(self, *batch: torch.Tensor) -> torch.Tensor:
        """One optimizer step on `batch` (split in `accumulation` micro-batches
        along dim 0, each split over the data-parallel ranks); returns the
        loss (the micro-batches' mean)."""
        if self._failed is not None:
            raise NonFiniteLossError(f"{self._failed}; this trainer stopped")
        batch = self._with_mask(batch)
        step = self.steps
        lr = _checked_lr(self.schedule(step), f"the learning rate of step {step} (lr({step}))")
        self._check_split(batch)
        for inputs in _micro_batches(batch, self.spec.accumulation):
            self._check(self._entry, self.input_names[:-1], inputs)
        if self._pooled:  # checked here, so a bad batch never reaches (and stops) the ranks
            loss = self._workers().call("train", (list(batch), lr, self.measure_memory))
            self._pool_steps = step + 1
            self._pool_measured |= self.measure_memory
        else:
            loss = self.run_step(batch, lr, self.measure_memory)
        if not bool(torch.isfinite(loss)):
            self._failed = (
                f"step {step} (counting from 0) had a non-finite loss ({loss.item()}); the "
                "parameters it updated are not saved. Resume from the last checkpoint with "
                "plait.load_training(directory)"
            )
            raise NonFiniteLossError(self._failed)
        return loss

    def run_step(
        self, batch: Sequence[torch.Tensor], lr: float, measure: bool = False
    ) -> torch.Tensor:
        """The step on this rank: `batch` checked, `lr` the learning rate;
        `measure`: record what it allocates (see `memory`)."""
        micro = _micro_batches(batch, self.spec.accumulation)
        lr_input = torch.tensor(lr, dtype=torch.float64, device=self.device)
        records: list[tuple[dict[str, int], int]] = []  # each program's, and what it held

        def run(function: str, inputs, held=None) -> tuple[torch.Tensor, ...]:
            if not measure:
                return self._run(function, inputs)
            # (a forward keeps views of weights for its backward: state, counted as such)
            resident = self._resident_storages()
            outputs, record = self._run_measured(function, inputs, resident)
            records.append((record, storage_bytes(held, resident)))
            return outputs

        if pipeline_plan(self.module) is not None:
            loss = self._run_stage(micro, lr_input, run)
        else:
            with torch.no_grad():
                losses = [run(ACCUMULATE, inputs)[0] for inputs in micro[:-1]]
                losses.append(run(TRAIN_STEP, (*micro[-1], lr_input))[0])
                loss = losses[0]
                for more in losses[1:]:
                    loss = loss + more
        if measure and pipeline_plan(self.module) is not None:
            # (the update ran last: it holds every stage's state)
            self._measured = pipelined_record(records, records[-1][0])
        elif measure:  # the step's peak: its program that needed the most
            self._measured = max((r for r, _ in records), key=lambda r: r[PEAK])
        return loss

    def _run_stage(self, micro: list[tuple], lr_input: torch.Tensor, run) -> torch.Tensor:
        """This rank's stage of a pipelined step: its actions of the schedule in
        order, each micro-batch's kept values from its forward to its backward;
        the loss (the last stage's, summed over micro-batches) on every rank."""
        from .backends.fx import MICRO_BATCH, SENDS

        plan = pipeline_plan(self.module)
        rank = self._pp_rank()
        last = plan.stages * plan.virtual - 1  # the stage with the loss
        kept: dict[tuple[int, int], tuple] = {}  # (micro-batch, stage) -> its forward's kept
        current = self._shared.setdefault(MICRO_BATCH, [0])  # (the programs' message tags)
        loss = torch.zeros((), device=self.device)
        actions = plan.actions[rank]
        receives: dict[str, list] = {}  # function -> its plait.recv ops
        with torch.no_grad():
            for position, action in enumerate(actions):
                kind, index, chunk = parse_action(action)
                if kind == UPDATE:
                    run(stage_function(UPDATE, rank), (lr_input,))
                    continue
                stage = plan.stage_of(rank, chunk)
                if position + 1 < len(actions):  # the next action's messages arrive meanwhile
                    self._post_receives(plan, rank, actions[position + 1], receives)
                current[0] = index
                if kind == "F":
                    outputs = run(stage_function(kind, stage), micro[index], kept)
                    if stage == last:
                        loss = loss + outputs[0]
                    kept[index, stage] = tuple(outputs[1:] if stage == last else outputs)
                else:
                    mine = kept.pop((index, stage))
                    run(stage_function(kind, stage), (*micro[index], *mine), kept)
            sends = self._shared.get(SENDS, [])  # (the programs' list: they went out async)
            for send in sends:
                send.wait()
            sends.clear()
            return _from_last_stage(loss, self._groups)

    def _post_receives(self, plan, rank: int, action: str, receives: dict) -> None:
        """Start receiving what `action` (this rank's next) receives: irecvs
        its programs' recvs wait on. `receives` caches each function's recv ops."""
        from .backends.fx import post_recv

        kind, index, chunk = parse_action(action)
        if kind == UPDATE:
            return
        function = stage_function(kind, plan.stage_of(rank, chunk))
        if function not in receives:
            receives[function] = _receives(self.module, function)
        for recv in receives[function]:
            post_recv(self._shared, recv, self._groups, index, self.device)

    def _with_mask(self, batch: tuple) -> tuple:
        if self.fills_mask and len(batch) == 2:  # (input_ids, labels)
            ids, labels = batch
            return ids, torch.ones_like(ids), labels
        return batch

    def _check_split(self, batch) -> None:
        """Every input splits evenly into micro-batches over the data-parallel ranks."""
        ranks = math.prod(n for axis, n in self.mesh.items() if axis in DATA_AXES)
        parts = ranks * self.spec.accumulation
        if ranks == 1:
            return
        mesh = ",".join(f"{axis}:{n}" for axis, n in self.mesh.items())
        for name, value in zip(self.input_names, batch):
            rows = value.shape[0] if isinstance(value, torch.Tensor) and value.dim() else None
            if rows is not None and rows % parts:
                over = f"{self.spec.accumulation} micro-batches x " if parts != ranks else ""
                raise TrainingError(
                    f"batch input '{name}' has {rows} rows (dim 0), which do not split over "
                    f"{over}{ranks} data-parallel ranks (mesh {mesh}); give a multiple of "
                    f"{parts} rows "
                    f"(e.g. {max(parts, rows - rows % parts)} or {rows - rows % parts + parts})"
                )

    def _check(self, function: str, names, inputs) -> None:
        fn = _function(self.module, function)
        if len(inputs) != len(names):
            raise TrainingError(
                f"step takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}"
            )
        symbols = self.module.attributes.get(SYMBOLS_ATTR)
        types = list(fn.function_type.inputs)[: len(names)]
        check_inputs(names, types, symbols.ranges if symbols is not None else {}, inputs)

    def _run(self, function: str, inputs) -> tuple[torch.Tensor, ...]:
        return self._program(function)(*[x.to(self.device) for x in inputs])

    def _run_measured(
        self, function: str, inputs, resident=frozenset()
    ) -> tuple[tuple, dict[str, int]]:
        """(outputs, what the run allocated: plait.runtime.memory's record)"""
        program = self._program(function)
        kinds = value_kinds(_function(self.module, function))
        inputs = [x.to(self.device) for x in inputs]
        return measure(program, inputs, kinds, self.device, resident)

    def _resident_storages(self) -> set[int]:
        """Addresses of the storages of this rank's state and weights."""
        return {
            t.untyped_storage().data_ptr()
            for key, t in self._shared.items()
            if isinstance(t, torch.Tensor) and key[0] in ("state", "weight")
        }

    def _workers(self):
        from .runtime.heartbeat import timeout_seconds
        from .runtime.workers import WorkerPool

        timeout = timeout_seconds(self.call_timeout)
        if self._pool is None or not self._pool.alive or self._pool.timeout != timeout:
            if self._pool is not None:  # a pool that lost a rank: its state is gone
                raise TrainingError(
                    "the worker ranks of this trainer stopped and their state with them; "
                    "resume from the last checkpoint with plait.load_training(directory)"
                )
            # the workers resume from a checkpoint of this trainer, removed when they stop
            self._pool = WorkerPool(
                self.save, load_on_rank, self.world_size, timeout, self.trusted_ops
            )
        return self._pool

    def close(self) -> None:
        """Stop the worker processes a sharded step runs on from one process
        (their state is lost: save first), after finishing a save in progress."""
        try:
            self.wait_saved()
        finally:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
                self._pool_steps = None
                self._pool_measured = False

    def gradients(self, *batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """The gradients a step on `batch` would update with (before clipping),
        by the model's parameter names (each name of a tied weight); nothing is
        updated. Needs accumulation=1 and one device."""
        if self.spec.accumulation != 1:
            raise TrainingError("gradients() runs one batch; it needs accumulation=1")
        if self.world_size > 1:
            raise TrainingError(
                "gradients() inspects the step on one device; compile it without shard{...} "
                "to compare gradients"
            )
        batch = self._with_mask(batch)
        self._check(TRAIN_STEP, self.input_names[:-1], batch)
        if GRADIENTS not in self._programs:
            module = gradient_module(self.module)
            self._programs[GRADIENTS] = build_program(
                module,
                self.weights,
                self.device,
                None,
                GRADIENTS,
                shared=self._shared,
                prefetching=Prefetcher,
            )
            self._gradient_names = sorted(gradients(_function(self.module, TRAIN_STEP)))
        lr = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            values = self._run(GRADIENTS, (*batch, lr))
        found = dict(zip(self._gradient_names, values))
        return {
            name: found[program]
            for name, program in self.state_dict_names.items()
            if program in found
        }

    def memory(self, measured: bool = False) -> dict[str, int] | list[dict[str, int]]:
        """Bytes each rank holds for the step: parameters, gradients, optimizer
        state and gradient accumulators, from the program's types (as `plait
        estimate` reports them; a pipelined step's: the costliest stage's).

        `measured=True`: what the last step run with `trainer.measure_memory =
        True` allocated on this rank (see plait.runtime.memory): its "peak"
        bytes of live tensor storage, and by kind those alive at the peak
        (parameters, gradients, optimizer state, gradient accumulators, inputs,
        saved activations, temporary; "unattributed": kernels' own, CUDA
        only). A pipelined rank's: its stages' state, plus the most one action
        allocated while the forwards' values kept for later backwards were
        held (`runtime.memory.pipelined_record`). A sharded step on worker
        processes gives a list, one per rank."""
        if not measured:
            plan = pipeline_plan(self.module)
            if plan is not None:  # the rank that holds the most
                stages = [
                    step_memory(_function(self.module, stage_function(UPDATE, s)))
                    for s in range(plan.stages)
                ]
                return max(stages, key=lambda m: sum(m.values()))
            return step_memory(_function(self.module, TRAIN_STEP))
        if not (self._pool_measured if self._pooled else self._measured):
            raise TrainingError(
                "no step was measured yet: set trainer.measure_memory = True before a "
                "step, then call trainer.memory(measured=True)"
            )
        if self._pooled:
            if self._pool is None or not self._pool.alive:
                raise TrainingError(
                    "the worker ranks that measured the step were stopped (trainer.close()); "
                    "ask for trainer.memory(measured=True) before closing them"
                )
            return self._workers().call("memory")
        return dict(self._measured)

    # ---- state -----------------------------------------------------------

    def _tensor(self, name: str) -> torch.Tensor:
        """The current value of a program name: live state, else its stored value."""
        live = self._shared.get(("state", name))
        return live if live is not None else self.weights.get(name)

    def saved_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds, by program name, as whole tensors: gathered
        from the ranks when the step is sharded (a collective: under torchrun
        every rank calls it)."""
        if self._pooled and self._pool is not None:
            return self._workers().call("state")
        names = self._saved_names()
        if self.world_size == 1 or self._pooled:  # (not yet started: the initial values)
            return {name: self._tensor(name) for name in names}
        if pipeline_plan(self.module) is not None:
            return self._stages_state(names)
        state = sorted(n for n in state_params(self.module) if n in set(names))
        if STATE not in self._programs:
            self._program(STATE, state_module(self.module, state))
        whole = dict(zip(state, self._programs[STATE]()))
        return {name: whole[name] if name in whole else self.weights.get(name) for name in names}

    def _stages_state(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The whole state of a pipelined step on every rank: each stage's
        gathered whole (over its other axes), then broadcast from the stage."""
        import torch.distributed as dist

        from .backends.fx import rank_at, torch_dtype

        rank = self._pp_rank()
        held = {  # (every rank's same list: the broadcasts must match)
            n: op for n, op in state_params(self.module).items() if not n.startswith(ACCUMULATOR)
        }
        owner = {n: _stage_of(op) for n, op in held.items()}
        ranks = pipeline_plan(self.module).stages  # (stage k runs on rank k % ranks)
        mine = sorted(n for n in held if owner[n] is None or owner[n] % ranks == rank)
        if STATE not in self._programs:
            self._program(STATE, state_module(self.module, mine))
        whole = dict(zip(mine, self._programs[STATE]()))
        first = CollectiveGroups(
            self._groups.names, self._groups.sizes, dict.fromkeys(self.mesh, 0)
        )
        types = {
            op.weight_name: op.result.type for op in self.source.walk() if isinstance(op, ParamOp)
        }
        out = {}
        for name in sorted(held):
            if owner[name] is None:  # every stage holds it (the step count)
                out[name] = whole[name]
                continue
            t = types[name]
            tensor = (
                whole[name].contiguous()
                if name in whole
                else torch.empty(
                    [int(d) for d in t.shape], dtype=torch_dtype(t.dtype), device=self.device
                )
            )
            dist.broadcast(tensor, rank_at(first, PIPELINE_AXIS, owner[name] % ranks))
            out[name] = tensor
        return {**{name: self.weights.get(name) for name in names if name not in out}, **out}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's parameters and buffers after training, by the model's
        state-dict names (`model.load_state_dict(trainer.state_dict())`): on
        one device the trainer's own tensors, not copies; whole tensors when
        sharded."""
        state = self.saved_state()
        return {name: state[program] for name, program in self.state_dict_names.items()}

    def _saved_names(self) -> list[str]:
        """Everything a checkpoint holds: the weights the plan reads, its state
        (not the gradient accumulators: zero between steps) and the model's
        tensors the plan does not read (a tied weight's other name is not one)."""
        # and the captured step's (which the checkpoint holds, before the pipeline
        # folded ops away: rotary's original_inv_freq)
        read = set(stored_weight_names(self.module)) | set(stored_weight_names(self.source))
        names = read | set(self.state_dict_names.values())
        state = (set(state_params(self.module)) & set(self.weights.names())) | self._live
        return sorted(n for n in names | state if not n.startswith(ACCUMULATOR + "."))

    def save(self, directory: str | Path, *, asynchronous: bool = False) -> Path:
        """Write a checkpoint: the step as captured (before the pipeline) and
        every parameter, buffer and optimizer state as whole tensors by name,
        with the step count, the options and the mesh it was trained on. Each
        rank writes its own pieces at once (see plait.runtime.checkpoint); the
        save is atomic, so an interrupted one keeps the previous checkpoint.
        Any mesh resumes from it (`plait.load_training(dir, pipeline=...)`).

        `asynchronous=True`: the state is copied to host memory now and
        written by a background thread while training goes on; `wait_saved()`
        (or the next save, or `close()`) finishes it and raises its errors."""
        self.wait_saved()
        if self._failed is not None:
            raise NonFiniteLossError(f"{self._failed}; nothing was saved")
        first = self._coordinates()
        staging = artifact.staging(directory)
        self._agree(_caught(lambda: artifact.start_staging(directory)) if first else None)
        if self._pooled and self._pool is not None:
            self._workers().call("write_pieces", (str(staging), asynchronous))
        else:
            self.write_pieces(str(staging), asynchronous)
        self._saving = (Path(directory), staging)
        if not asynchronous:
            self.wait_saved()
        return Path(directory)

    def wait_saved(self) -> Path | None:
        """Finish the asynchronous save in progress, if any (raising what went
        wrong writing it): the checkpoint's directory, else None."""
        if self._saving is None:
            return None
        directory, staging = self._saving
        self._saving = None
        first = self._coordinates()
        try:
            self._agree(_caught(self._all_pieces_written))
            self._agree(_caught(lambda: self._finish_save(directory, staging)) if first else None)
        except BaseException:
            if first:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        return directory

    def write_pieces(self, staging: str, asynchronous: bool = False) -> None:
        """This rank's part of a save: its pieces of the state into `staging`;
        `asynchronous`: copied to host memory now and written by a thread
        (`pieces_written` waits for it)."""
        import torch.distributed as dist

        rank = dist.get_rank() if self.world_size > 1 and _in_process_group() else 0
        pieces = self._pieces(first=rank == 0)
        if asynchronous:  # a copy: the steps go on updating the state in place
            pieces = [replace(p, tensor=p.tensor.detach().to("cpu", copy=True)) for p in pieces]
            self._writing = _Background(checkpoint.write_pieces, Path(staging), rank, pieces)
        else:
            checkpoint.write_pieces(Path(staging), rank, pieces)

    def pieces_written(self) -> None:
        """Wait for this rank's asynchronous `write_pieces` (raising its error)."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.wait()

    def _all_pieces_written(self) -> None:
        """Wait for this process's ranks' pieces: its worker ranks', else its own."""
        if self._pooled and self._pool is not None:
            self._workers().call("pieces_written")
        else:
            self.pieces_written()

    def _pieces(self, first: bool) -> list[checkpoint.Piece]:
        """What this rank writes: the pieces of live state it is the lowest to
        hold; the first rank also the tensors no program holds, whole."""
        pieces = []
        elsewhere = self._other_stages_state()
        for name in self._saved_names():
            layout = self._shared.get(("layout", name))
            if layout is None:
                if first and name not in elsewhere:
                    pieces.append(checkpoint.Piece(name, self._tensor(name)))
            elif layout.owner:
                tensor = self._shared["state", layout.key]
                pieces.append(checkpoint.Piece(name, tensor, layout.shard, layout.flat))
        return pieces

    def _other_stages_state(self) -> set[str]:
        """The state other pipeline stages hold (their ranks write it), once
        this rank's stage programs are built; else none."""
        if pipeline_plan(self.module) is None or not self._programs:
            return set()
        return set(state_params(self.module)) - self._live

    def _coordinates(self) -> bool:
        """This process finishes a save (this trainer's only one, or rank 0 under torchrun)."""
        import torch.distributed as dist

        return self.world_size == 1 or self._pooled or dist.get_rank() == 0

    def _agree(self, error: BaseException | None) -> None:
        """Raise `error` here, and on every rank when one rank had one (no rank
        waits for another that failed)."""
        if self.world_size > 1 and not self._pooled:
            import torch.distributed as dist

            ok = torch.tensor([0 if error is not None else 1], device=self.device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if error is None and not ok.item():
                raise TrainingError("another rank failed to save the checkpoint; see its error")
        if error is not None:
            raise error

    def _finish_save(self, directory: Path, staging: Path) -> None:
        """Index the ranks' pieces, write the step and manifest, and move the
        checkpoint into place."""
        ranks = self.world_size if self._pool is not None or not self._pooled else 1
        shapes = {
            op.weight_name: [int(d) for d in op.result.type.shape]
            for op in self.source.walk()
            if isinstance(op, ParamOp)
        }
        hashes = checkpoint.write_index(staging, ranks, shapes)
        saved = WeightStore()
        checkpoint.add_indexed(saved, staging, set(hashes))
        fn = _function(self.source, TRAIN_STEP)
        symbols = self.source.attributes.get(SYMBOLS_ATTR)
        manifest = {
            "pipeline": self.pipeline,
            "mesh": {"world_size": 1, "axes": {}},  # the captured step's: one device
            "inputs": [
                {"name": n, "type": str(t)}
                for n, t in zip(self.input_names, fn.function_type.inputs)
            ],
            "symbols": {n: list(r) for n, r in (symbols.ranges if symbols else {}).items()},
            "outputs": {"count": 1, "treespec": None},
            "device": self.device.type,
            "generation": {},
            artifact.STATE: checkpoint.INDEX,
            TRAINING: {
                **self.spec.as_json(),
                "lr": self.constant_lr,
                "fills_mask": self.fills_mask,
                "state_dict": self.state_dict_names,
                "saved": sorted(saved.names()),
                "trained_on": self.mesh,
            },
        }
        plan, code = self._source_text(saved)
        contents = artifact.Artifact(plan=plan, programs={0: code}, manifest=manifest)
        artifact.write(
            directory,
            contents,
            WeightStore(),
            [],
            written=(staging, hashes),
            remove_replaced_later=True,
        )

    def _source_text(self, saved: WeightStore) -> tuple[str, str]:
        """The captured step's IR and program code, as a checkpoint shows them:
        the same for every save, so made once (building the code takes longer
        than writing a small model's tensors)."""
        if self._source_text_cache is None:
            meta = saved.as_meta()
            code = "\n".join(
                f"# ---- @{f} ----"
                f"{build_program(self.source, meta, 'cpu', None, f, prefetching=Prefetcher).code}"
                for f in _function_names(self.source)
            )
            self._source_text_cache = (print_module(self.source), code)
        return self._source_text_cache


def _receives(module: ModuleOp, function: str) -> list:
    """The plait.recv ops of a function, in order."""
    from .ir.ops import RecvOp

    return [op for op in _function(module, function).walk() if isinstance(op, RecvOp)]


def _rank_functions(plan, rank: int) -> set[str]:
    """The functions a rank of a pipelined step runs: its stages' and its update."""
    stages = plan.stages_of(rank)
    return {stage_function(k, s) for k in ("F", "B") for s in stages} | {
        stage_function(UPDATE, rank)
    }


def _stage_of(op: ParamOp) -> int | None:
    """The pipeline stage that holds a state (None: every stage, the step count)."""
    from .ir.attrs import STAGE_ATTR

    attr = op.attributes.get(STAGE_ATTR)
    return attr.value.data if attr is not None else None


def _from_last_stage(loss: torch.Tensor, groups: CollectiveGroups) -> torch.Tensor:
    """The last stage's loss on every stage (the others give zeros): summed over `pp`."""
    c10d = torch.ops._c10d_functional
    total = c10d.all_reduce(loss, "sum", groups.names[PIPELINE_AXIS])
    return c10d.wait_tensor(total)


class _Background:
    """A function run by a thread; `wait` joins it and raises what it raised."""

    def __init__(self, function: Callable, *args):
        self._error: BaseException | None = None

        def run() -> None:
            try:
                function(*args)
            except BaseException as exc:  # raised where the caller waits
                self._error = exc

        self._thread = threading.Thread(target=run, name="plait-save", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _caught(function: Callable) -> BaseException | None:
    """What `function()` raised, else None."""
    try:
        function()
    except Exception as exc:
        return exc
    return None


TRAINING = "training"  # the manifest's field for a training checkpoint


def compile_training(
    model: torch.nn.Module,
    example_args: Sequence,
    *,
    loss_fn: Callable | None = None,
    optimizer: str = "adamw",
    lr: float | Schedule = 1e-3,
    accumulation: int = 1,
    clip_grad_norm: float | None = None,
    precision: str = "fp32",
    pipeline: str = DEFAULT_PIPELINE,
    dynamic_shapes=None,
    device: str | torch.device | None = None,
    initial_weights: str | Path | None = None,
    **optimizer_options,
) -> Trainer:
    """Compile one training step of `model`: forward, backward and optimizer
    update, as one program whose state is the model's parameters and the
    optimizer's moments.

    `model(*example_args)` returns the loss (a scalar tensor, or an output
    with `.loss`), or `loss_fn(output, *args)` computes it. A transformers
    model takes (input_ids, attention_mask, labels), or (input_ids, labels).
    `optimizer` is "adamw", "adam" or "sgd", with torch.optim's options and
    defaults as keywords (betas, eps, weight_decay; momentum, dampening,
    nesterov). `lr` is a number or a schedule `lr(step)` (step counts from 0),
    fed to the program each step. `accumulation=K` splits each batch in K
    micro-batches along dim 0 and sums their gradients as `(loss / K).backward()`
    per micro-batch would; `example_args` is a whole batch. `clip_grad_norm`
    clips as torch.nn.utils.clip_grad_norm_. `precision="bf16-mixed"` runs the
    forward and backward under torch.autocast(bfloat16), with fp32 parameters,
    gradients and optimizer state. `dynamic_shapes` is torch.export's, for one
    micro-batch, by input name or position. `initial_weights`: a torch
    Distributed Checkpoint directory (`torch.distributed.checkpoint.save` of
    the model's state dict) whose tensors start the training instead of the
    model's (which are not changed); see plait.runtime.dcp for how it is read.
    """
    _schedule(lr)  # a bad lr should not wait for the export
    manager = PassManager.parse(pipeline)
    accumulation = _pipeline_micro_batches(manager, accumulation, example_args)
    spec = TrainingSpec(optimizer, dict(optimizer_options), accumulation, clip_grad_norm, precision)
    hf = is_hf_model(model)
    args = tuple(example_args)
    fills_mask = hf and len(args) == 2
    if fills_mask:
        args = (args[0], torch.ones_like(args[0]), args[1])
    captured = capture_training(
        model, _micro_batches(args, accumulation)[0], spec, loss_fn, dynamic_shapes
    )
    if initial_weights is not None:
        _start_from_dcp(captured, initial_weights)
    source = _without_unread_params(captured.module.clone())
    manager.run(captured.module, captured.weights)
    _check_program(captured.module, pipeline, captured.trained)
    if device is None:
        device = next(model.parameters()).device
    return Trainer(
        captured.module,
        captured.weights,
        spec,
        lr,
        pipeline=pipeline,
        input_names=captured.input_names,
        state_dict_names=captured.state_dict,
        fills_mask=fills_mask,
        device=device,
        source=source,
    )


def _pipeline_micro_batches(manager: PassManager, accumulation: int, batch) -> int:
    """The micro-batches a pipeline pass splits the batch in: the step is
    captured for them (each one's loss divided by their number, as
    accumulation divides it)."""
    stages = _splitting_passes(manager)
    if not stages:
        return accumulation
    micro, name = stages[0].microbatches, stages[0].name
    for i, value in enumerate(batch):
        rows = value.shape[0] if isinstance(value, torch.Tensor) and value.dim() else None
        if rows is not None and rows % micro:
            raise TrainingError(
                f"{name}{{microbatches={micro}}} splits the batch along dim 0, but batch "
                f"input #{i} has {rows} rows; give microbatches that divide {rows}, or a batch "
                f"of a multiple of {micro} rows"
            )
    if accumulation not in (1, micro):
        raise TrainingError(
            f"accumulation={accumulation} and {name}{{microbatches={micro}}} both split the "
            f"batch; give one of them (the pipeline's micro-batches accumulate gradients)"
        )
    return micro


def _splitting_passes(manager: PassManager) -> list:
    """The passes that split a step's batch into micro-batches: `pipeline`, and
    `parallelize`, which may choose pipeline stages."""
    return [p for p in manager.passes if p.name in ("pipeline", "parallelize")]


def _start_from_dcp(captured, directory: str | Path) -> None:
    """The captured step's initial parameters and buffers: the DCP checkpoint's."""
    from .runtime.dcp import read_dcp

    meta = captured.weights.as_meta()
    wanted = {name: meta.get(program) for name, program in captured.state_dict.items()}
    for name, tensor in read_dcp(directory, wanted).items():
        captured.weights.add(captured.state_dict[name], tensor)


def _without_unread_params(module: ModuleOp) -> ModuleOp:
    """`module` without the weights nothing reads (a tied weight's other name):
    a checkpoint holds what its step reads."""
    for op in list(module.walk()):
        if isinstance(op, ParamOp) and not op.is_state and not op.result.uses:
            op.detach()
            op.erase()
    return module


def _check_program(module: ModuleOp, pipeline: str, trained: list[str]) -> None:
    """What the training IR promises, after the passes: state read before it
    is overwritten, and every trained parameter's gradient marked."""
    check_state_order(module)
    plan = pipeline_plan(module)
    steps = (
        [TRAIN_STEP] if plan is None else [stage_function(UPDATE, s) for s in range(plan.stages)]
    )
    marked = {name for f in steps for name in gradients(_function(module, f))}
    lost = sorted(set(trained) - marked)
    if lost:
        raise TrainingError(
            f"after the pipeline '{pipeline}', the gradient of '{lost[0]}' is no longer "
            "marked (plait.grad_of); a pass replaced it without keeping the mark"
        )


# ---- loading ------------------------------------------------------------------


def _training_fields(manifest: dict, path: Path) -> dict:
    """The manifest's training field, checked (a checkpoint is data a stranger may write)."""
    fields = manifest.get(TRAINING)
    if not isinstance(fields, dict):
        raise TrainingError(
            f"{path}: not a training checkpoint (its manifest has no '{TRAINING}' field); "
            "load a compiled model with plait.load"
        )
    checks = {
        "optimizer": lambda v: isinstance(v, str),
        "options": lambda v: isinstance(v, dict),
        "accumulation": lambda v: isinstance(v, int),
        "clip_grad_norm": lambda v: v is None or isinstance(v, (int, float)),
        "precision": lambda v: isinstance(v, str),
        "lr": lambda v: v is None or isinstance(v, (int, float)),
        "fills_mask": lambda v: isinstance(v, bool),
        "state_dict": lambda v: (
            isinstance(v, dict)
            and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())
        ),
        "saved": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    }
    for key, ok in checks.items():
        if key not in fields or not ok(fields[key]):
            raise TrainingError(
                f"{path}: field '{TRAINING}.{key}' is missing or malformed "
                f"({json.dumps(fields.get(key))[:60]}); save the checkpoint again"
            )
    return fields


def load_training(
    directory: str | Path,
    *,
    lr: float | Schedule | None = None,
    pipeline: str | None = None,
    device: str | torch.device = "cpu",
    trusted_ops: Iterable[str] = (),
    verify: bool = True,
) -> Trainer:
    """Resume from a checkpoint written by `Trainer.save`: parameters, buffers,
    optimizer state and step count as saved. A learning-rate schedule is code,
    which a checkpoint never holds: pass it again as `lr` (a constant lr was
    saved; `lr` replaces it). The step runs the checkpoint's pipeline, or
    `pipeline` (another mesh: `"canonicalize,cse,dce"` resumes a sharded run
    on one device). `trusted_ops` as for plait.load."""
    contents, source, _ = artifact.read(directory, trusted_ops, verify)
    path = Path(directory) / artifact.MANIFEST
    fields = _training_fields(contents.manifest, path)
    if lr is None:
        if fields["lr"] is None:
            raise TrainingError(
                f"{directory} was trained with a learning-rate schedule, a Python callable that "
                "a checkpoint cannot hold; pass it again: plait.load_training(dir, lr=schedule)"
            )
        lr = fields["lr"]
    spec = TrainingSpec(
        fields["optimizer"],
        fields["options"],
        fields["accumulation"],
        fields["clip_grad_norm"],
        fields["precision"],
    )
    weights = artifact.read_weights(directory, contents.manifest, fields["saved"])
    pipeline = contents.manifest["pipeline"] if pipeline is None else pipeline
    module = source.clone()
    manager = PassManager.parse(pipeline)
    stages = _splitting_passes(manager)
    if stages and stages[0].microbatches != spec.accumulation:
        raise TrainingError(
            f"{directory} holds a step captured for {spec.accumulation} micro-batch(es), but "
            f"the pipeline asks for {stages[0].name}{{microbatches={stages[0].microbatches}}}; "
            f"use microbatches={spec.accumulation}"
        )
    manager.run(module, weights)
    check_state_order(module)
    names = [entry["name"] for entry in contents.manifest["inputs"]]
    return Trainer(
        module,
        weights,
        spec,
        lr,
        pipeline=pipeline,
        input_names=names,
        state_dict_names=fields["state_dict"],
        fills_mask=fields["fills_mask"],
        device=device,
        source=source,
    )


__all__ = ["NonFiniteLossError", "Trainer", "compile_training", "load_training"]


def load_on_rank(directory: str, *, trusted_ops: Iterable[str], verify: bool) -> Trainer:
    """A worker rank's trainer: the checkpoint its caller wrote, its step built
    (its slices of the state read) before the first call, which brings its
    learning rate."""
    trainer = load_training(directory, lr=0.0, trusted_ops=trusted_ops, verify=verify)
    trainer.prepare()
    return trainer
