"""plait's Python API: compile a model, call it, inspect it, save and load it.

import plait
compiled = plait.compile(model, (x,), pipeline="canonicalize,cse,dce")
y = compiled(x)                 # runs the compiled per-rank program
print(compiled.ir)              # the plan, as IR text
print(compiled.code)            # the program, as Python
compiled.save("out/")           # an artifact directory
# a plan sharded over N ranks runs on N local worker processes when called here
again = plait.load("out/")
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp

from .backends.fx import (
    MICRO_BATCH,
    SENDS,
    CollectiveGroups,
    Program,
    build_program,
    mesh_coords,
    run_observed,
)
from .frontend import hf
from .frontend.capture import capture
from .frontend.importer import import_program
from .ir.attrs import PIPELINE_AXIS, SYMBOLS_ATTR, mesh_axes
from .ir.errors import PlaitError
from .ir.libraries import libraries
from .ir.ops import stored_weight_names
from .ir.text import print_module
from .ir.weights import WeightStore
from .passes.manager import PassManager
from .passes.registry import DEFAULT_PIPELINE
from .passes.shard.decode_stages import (
    logits_function_name,
    sequence_groups,
    split_name,
    stage_function_name,
)
from .runtime import artifact
from .runtime.inputs import bind_inputs, check_inputs, check_token_ids, token_id_limits
from .runtime.prefetch import Prefetcher


class CompiledModel:
    """A compiled model: callable, with its IR, program source and weights."""

    def __init__(
        self,
        module: ModuleOp,
        weights: WeightStore,
        pipeline: str,
        out_spec: str | None = None,
        device: str | torch.device = "cpu",
        pass_report: str | None = None,
        generation: dict | None = None,
    ):
        self.module = module
        self.pipeline = pipeline
        self.out_spec = out_spec
        self.device = torch.device(device)
        self.pass_report = pass_report
        self.weights = weights.subset(self.weight_names)
        # for generation: default token ids ({"eos_token_id": 2, "pad_token_id": 0})
        self.generation = dict(generation or {})
        self._directory: Path | None = None  # the artifact it was loaded from
        # modules that register the custom ops the plan calls, which worker ranks
        # import: those named to plait.load, or, for a model compiled here, the
        # libraries capture recorded that this process has imported
        self.trusted_ops: tuple[str, ...] = _imported_libraries(module)
        self._pool = None  # worker processes, for a sharded plan called in one process
        # seconds a worker rank may stay silent (stopped, hung) before a call
        # fails; None: $PLAIT_TIMEOUT, else 60. A busy rank is never silent.
        self.call_timeout: float | None = None
        self._programs: dict[str, Program] = {}
        self._shared: dict = {}  # what its programs share: weights, state (KV cache), arena
        # pipelined generation's other groups of sequences: their programs, and the
        # shared dict of each (the weights and arena above, a KV cache of its own)
        self._group_programs: dict[tuple[str, int], Program] = {}
        self._group_shared: dict[int, dict] = {}
        self._mesh_groups: CollectiveGroups | None = None
        self._limits: dict[str, dict] = {}  # function -> its token-id inputs' table sizes

    @property
    def functions(self) -> list[str]:
        """The module's programs: ["forward"], or ["prefill", "decode"] for generation."""
        return [op.sym_name.data for op in self.module.ops if isinstance(op, func.FuncOp)]

    @property
    def function(self) -> func.FuncOp:
        """The entry point that calling the model runs: @forward, else the first function."""
        functions = [op for op in self.module.ops if isinstance(op, func.FuncOp)]
        if not functions:
            raise PlaitError("the IR module has no func.func to run")
        return next((f for f in functions if f.sym_name.data == "forward"), functions[0])

    @cached_property
    def weight_names(self) -> list[str]:
        return stored_weight_names(self.module)

    @cached_property
    def _output_spec(self):
        from .runtime.outputs import load_spec

        return load_spec(self.out_spec, self._directory) if self.out_spec is not None else None

    @cached_property
    def _has_meta_weights(self) -> bool:
        return any(self.weights.is_meta(n) for n in self.weight_names)

    @property
    def ir(self) -> str:
        """The plan as IR text (parses back with `plait opt`)."""
        return print_module(self.module)

    @property
    def mesh(self) -> dict[str, int]:
        """The device mesh the plan was sharded for ({} for one device)."""
        return mesh_axes(self.module)

    @property
    def world_size(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def program(self) -> Program:
        """This rank's torch program of the entry function, built on first use
        (under torchrun or an initialized process group when the plan spans
        several ranks)."""
        return self.program_of(self._on_rank(self.function.sym_name.data))

    def program_of(self, function: str, group: int = 0) -> Program:
        """This rank's program of `function`; the programs of one model share
        its weights and its state (the KV cache; of pipelined generation's
        sequence `group`, its own)."""
        if group:
            return self._group_program(function, group)
        if function not in self._programs:
            self._programs[function] = self._build(
                self.weights, self.device, self._collective_groups(), function, self._shared
            )
        return self._programs[function]

    def _collective_groups(self) -> CollectiveGroups | None:
        """The mesh's process groups, made once: every rank makes every group
        together, and pipeline stages build different numbers of programs."""
        if self.world_size == 1:
            return None
        if self._mesh_groups is None:
            from .runtime.distributed import mesh_groups

            self._mesh_groups = mesh_groups(self.mesh)
        return self._mesh_groups

    def _group_program(self, function: str, group: int) -> Program:
        """`function`'s program for a group of sequences other than the first:
        group 0's weights, its own state and activation arena (a group's results
        and messages stay intact while other groups run), its messages' tags
        shifted by `group`."""
        if (function, group) not in self._group_programs:
            self.program_of(function)  # the weights it shares, read once
            shared = self._group_shared.setdefault(group, {MICRO_BATCH: [group]})
            shared.setdefault(SENDS, self._shared.setdefault(SENDS, []))
            for key, value in self._shared.items():
                if key[0] not in ("state", "layout", "arena", MICRO_BATCH[0]):
                    shared.setdefault(key, value)
            program = self._build(
                self.weights, self.device, self._collective_groups(), function, shared
            )
            self._group_programs[function, group] = program
        return self._group_programs[function, group]

    def rank_code(self, rank: int, device: str | torch.device | None = None) -> str:
        """The program source of `rank` on `device` (default the model's), with
        groups named after mesh axes (built on meta weights: no weight is
        read); one section per function when there are several."""
        groups = CollectiveGroups.placeholder(self.mesh, rank) if self.mesh else None
        weights = self.weights.as_meta()
        device = self.device if device is None else device
        functions = [f for f in self.functions if self._on_rank(f, rank) == f]  # its stages'
        return _joined({f: self._build(weights, device, groups, f).code for f in functions})

    def _build(self, weights, device, groups, function: str, shared=None) -> Program:
        """The program of `function`; streamed weights come through a Prefetcher."""
        return build_program(
            self.module, weights, device, groups, function, shared=shared, prefetching=Prefetcher
        )

    @property
    def code(self) -> str:
        """The program's Python source (rank 0's for a sharded plan)."""
        if self.world_size > 1:
            return self.rank_code(0)
        return _joined({f: self.program_of(f).code for f in self.functions})

    @property
    def input_names(self) -> list[str]:
        return [
            a.name_hint or f"input_{i}" for i, a in enumerate(self.function.body.blocks.first.args)
        ]

    def __call__(self, *args, **kwargs):
        names = self.input_names
        inputs = bind_inputs(names, args, kwargs)
        check_inputs(names, list(self.function.function_type.inputs), self.symbols, inputs)
        check_token_ids(names, self._token_limits(self.function.sym_name.data), inputs)
        self._check_weights()
        if self.world_size > 1 and not _in_process_group():  # one local process per rank
            outputs = self._workers().call("__call__", inputs)
        else:
            outputs = self._call(self.function.sym_name.data, inputs)
        if self._output_spec is not None:
            return pytree.tree_unflatten(list(outputs), self._output_spec)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _check_weights(self) -> None:
        if self._has_meta_weights:
            raise PlaitError(
                "the model's weights are on the meta device; load real weights "
                "(e.g. a checkpoint) into the model before compiling it to run it"
            )

    def _workers(self):
        from .runtime.heartbeat import timeout_seconds
        from .runtime.workers import WorkerPool

        timeout = timeout_seconds(self.call_timeout)
        if self._pool is None or not self._pool.alive or self._pool.timeout != timeout:
            self.close()  # a pool that lost a rank (or has another timeout): start afresh
            # the workers read the artifact the model was loaded from, else a
            # temporary save that the pool removes when it stops
            self._pool = WorkerPool(
                self._directory or self.save,
                load_on_rank,
                self.world_size,
                timeout,
                self.trusted_ops,
            )
        return self._pool

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        attention_mask: torch.Tensor | None = None,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy or sampled decoding with the KV cache of a model compiled with
        `plait.compile_generation`; returns the prompt followed by the new tokens,
        like `transformers`' generate. EOS and pad ids default to the model's.

            tokens = compiled.generate(input_ids, max_new_tokens=32)
            tokens = compiled.generate(ids, 64, mask, do_sample=True, top_p=0.9, seed=0)
        """
        from .runtime.generate import Sampling, check_request, generate

        batch, max_length = self.cache_size  # (raises unless compiled for generation)
        self._check_weights()
        sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
        # checked here, so a bad request never reaches (and stops) the worker ranks
        check_request(batch, max_length, input_ids, max_new_tokens, attention_mask, sampling)
        limits = self._token_limits("prefill")
        prompt_limit = {0: limits[0]} if 0 in limits else {}  # positions are the loop's own
        check_token_ids(["input_ids"], prompt_limit, [input_ids])
        in_group = _in_process_group()
        if do_sample and seed is None and self.world_size > 1:
            seed = _common_seed(in_group)  # every rank must draw the same tokens
            sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
        if self.world_size > 1 and not in_group:
            options = dict(
                attention_mask=attention_mask,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
            )
            return self._workers().call("generate", (input_ids, max_new_tokens), options)
        ids = {"eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
        ids = {k: v if v is not None else self.generation.get(k) for k, v in ids.items()}

        def run(group: int, function: str, *inputs: torch.Tensor):
            finish = self._start(function, inputs, group)
            return lambda: finish()[0]

        with torch.inference_mode():
            return generate(
                run,
                batch,
                max_length,
                input_ids,
                max_new_tokens,
                attention_mask,
                sampling,
                groups=sequence_groups(self.module),
                **ids,
            )

    def run(self, function: str, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Run one program of the module on tensor inputs and return its outputs,
        e.g. a decode step: `compiled.run("decode", ids, positions, slots, cache_mask)`."""
        fn = self._function_named(function)
        if fn is None:
            raise PlaitError(f"the model has no @{function}; it has {', '.join(self.functions)}")
        names = [a.name_hint or f"input_{i}" for i, a in enumerate(fn.body.blocks.first.args)]
        check_inputs(names, list(fn.function_type.inputs), self.symbols, list(inputs))
        check_token_ids(names, self._token_limits(function), list(inputs))
        self._check_weights()
        if self.world_size > 1 and not _in_process_group():
            return self._workers().call("run", (function, *inputs))
        return list(self._call(function, inputs))

    def _call(self, function: str, inputs) -> tuple[torch.Tensor, ...]:
        """This rank's program of `function` on `inputs`, moved to the model's device."""
        return self._start(function, inputs)()

    def _start(self, function: str, inputs, group: int = 0):
        """Run this rank's program of `function` on `inputs`, for sequence
        `group`; returns the function that gives its outputs: on a pipeline
        stage before the last, the logits the last stage sends back (taken
        as late as possible, so that the stage can start another group first)."""
        sends = self._shared.setdefault(SENDS, [])
        before = len(sends)
        local = self._on_rank(function)
        program = self.program_of(local, group)
        outputs = program(*[x.to(self.device) for x in inputs])
        mine = sends[before:]  # its messages to the next stage (or the logits, sent back)
        del sends[before:]

        def finish():
            result = outputs
            if not result and local != function:  # a stage before the last
                name, stage = split_name(local)
                result = self.program_of(logits_function_name(name, stage), group)()
            for send in mine:
                send.wait()
            return result

        return finish

    def _on_rank(self, function: str, rank: int | None = None) -> str:
        """The function `rank` (default this process's) runs for `function`: of
        generation programs cut into pipeline stages, its stage's ("decode" ->
        "decode_stage1" on stage 1), else `function` itself."""
        name = split_name(function)[0]
        if PIPELINE_AXIS not in self.mesh or self._exact(stage_function_name(name, 0)) is None:
            return function
        if rank is None:
            rank = _process_rank()
        return stage_function_name(name, mesh_coords(self.mesh, rank)[PIPELINE_AXIS])

    @property
    def cache_size(self) -> tuple[int, int]:
        """(batch, max_length) of the KV cache the generation programs were compiled for."""
        decode = self._function_named("decode")
        if decode is None or self._function_named("prefill") is None:
            raise PlaitError(
                "this model has no @prefill and @decode programs; compile it for generation "
                "with plait.compile_generation(model, batch=..., max_length=...)"
            )
        ids = decode.function_type.inputs.data[0]
        groups = sequence_groups(self.module)  # pipelined: groups of sequences, each its cache
        return ids.shape[0] * groups, self.symbols["context"][1]  # the most slots attention reads

    def _token_limits(self, function: str) -> dict[int, tuple[int, str]]:
        """Inputs of `function` that index an embedding: position -> (rows, where)."""
        if function not in self._limits:
            self._limits[function] = token_id_limits(self._function_named(function), self.mesh)
        return self._limits[function]

    def _function_named(self, name: str) -> func.FuncOp | None:
        """@name, or its first pipeline stage's (the same inputs, for checking them)."""
        found = self._exact(name)
        if found is None and split_name(name)[1] is None:
            return self._exact(stage_function_name(name, 0))
        return found

    def _exact(self, name: str) -> func.FuncOp | None:
        return next(
            (
                op
                for op in self.module.ops
                if isinstance(op, func.FuncOp) and op.sym_name.data == name
            ),
            None,
        )

    def close(self) -> None:
        """Stop the worker processes a sharded plan called from one process runs on."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def estimate(self, hardware="h100-sxm", mesh=None, values=None, context=None, function=None):
        """Predicted time, memory and communication of this plan (its entry
        function, or `function`, e.g. "decode") on `hardware`.

        est = compiled.estimate("h100-sxm", values={"batch": 1, "seq": 2048})
        est.schedule.step_time, est.comm_share, est.formulas["flops"]
        """
        from .cost.estimate import Target, estimate
        from .hardware import Hardware, load

        hw = hardware if isinstance(hardware, Hardware) else load(hardware)
        target = Target(hw, dict(mesh or {}), dict(values or {}), context)
        return estimate(self.module, target, function)

    @property
    def symbols(self) -> dict[str, tuple[int, int | None]]:
        """The size symbols and their ranges."""
        attr = self.module.attributes.get(SYMBOLS_ATTR)
        return attr.ranges if attr is not None else {}

    def save(self, directory: str | Path) -> Path:
        """Write an artifact directory (see `plait.runtime.artifact`), atomically:
        an artifact already there is replaced only once the new one is complete."""
        function = self.function
        manifest = {
            "pipeline": self.pipeline,
            "mesh": {"world_size": self.world_size, "axes": self.mesh},
            "inputs": [
                {"name": name, "type": str(t)}
                for name, t in zip(self.input_names, function.function_type.inputs)
            ],
            "symbols": {n: list(r) for n, r in self.symbols.items()},
            "outputs": {"count": len(function.function_type.outputs), "treespec": self.out_spec},
            "device": str(self.device.type),
            "generation": self.generation,
        }
        # for the device type, not index: one artifact serves every cuda:N
        programs = {r: self.rank_code(r, self.device.type) for r in range(self.world_size)}
        contents = artifact.Artifact(plan=self.ir, programs=programs, manifest=manifest)
        return artifact.write(directory, contents, self.weights, self.weight_names)


def _out_spec(program: torch.export.ExportedProgram) -> str | None:
    try:
        return pytree.treespec_dumps(program.call_spec.out_spec)
    except Exception:  # specs of custom containers do not serialize; fall back to a tuple
        return None


def compile(
    model: torch.nn.Module,
    example_inputs: Sequence,
    *,
    pipeline: str = DEFAULT_PIPELINE,
    dynamic_shapes=None,
    device: str | torch.device | None = None,
    calibration: Iterable[Sequence] = (),
    **options,
) -> CompiledModel:
    """Capture `model` on `example_inputs`, run `pipeline`, and return a CompiledModel.

    `example_inputs` may be real, fake or meta tensors. `dynamic_shapes` is
    torch.export's spec; its Dim names become the IR's size symbols:

        compiled = plait.compile(model, (ids,), dynamic_shapes={"ids": {0: Dim("batch", max=64)}})

    A `transformers` model may be given as it is, called on (input_ids[,
    attention_mask]): it is wrapped for its task as `frontend.hf.wrap` does
    (the compiled model returns logits, or a base model's last_hidden_state;
    the mask defaults to ones).

    `calibration` is a list of input tuples that passes gathering activation
    statistics run the program on (`sparsify{importance=activation}`).
    `options` go to the pass manager: dump_ir=DIR, print_ir_after_all,
    print_ir_before={...}, print_ir_after={...}, verify_each.
    """
    manager = PassManager.parse(pipeline, **options)  # a typo should not wait for the export
    if hf.is_transformers_model(model):
        model, example_inputs, dynamic_shapes = hf.prepare(model, example_inputs, dynamic_shapes)
    captured = capture(model, example_inputs, dynamic_shapes)
    module, weights = import_program(captured)
    manager.run(module, weights, calibration, run_observed)
    if device is None:
        device = _weights_device(weights)
    return CompiledModel(
        module, weights, pipeline, _out_spec(captured.program), device, manager.report()
    )


def compile_generation(
    model: torch.nn.Module,
    *,
    batch: int = 1,
    max_length: int = 256,
    pipeline: str = DEFAULT_PIPELINE,
    device: str | torch.device | None = None,
    **options,
) -> CompiledModel:
    """Compile a `transformers` `*ForCausalLM` model for autoregressive decoding:
    @prefill (a prompt) and @decode (one token) programs that share the weights
    and a static KV cache of `batch` sequences x `max_length` tokens, which
    sharding splits by kv heads. Options are `compile`'s.

        compiled = plait.compile_generation(model, batch=2, max_length=128,
                                            pipeline="shard{mesh=tp:2}")
        tokens = compiled.generate(input_ids, max_new_tokens=32)
    """
    from .frontend.decoding import capture_generation

    manager = PassManager.parse(pipeline, **options)
    groups = next((p.microbatches for p in manager.passes if p.name == "pipeline"), 1)
    if batch % groups:
        raise PlaitError(
            f"pipeline{{microbatches={groups}}} runs groups of batch / {groups} sequences, "
            f"but batch is {batch}; give a batch that {groups} divides"
        )
    module, weights = capture_generation(model, batch // groups, max_length)
    manager.run(module, weights)
    config = getattr(model, "generation_config", None)
    ids = {k: getattr(config, k, None) for k in ("eos_token_id", "pad_token_id")}
    return CompiledModel(
        module,
        weights,
        pipeline,
        None,
        device or _weights_device(weights),
        manager.report(),
        generation={k: v for k, v in ids.items() if v is not None},
    )


def compile_ir(
    module: ModuleOp,
    weights: WeightStore,
    *,
    pipeline: str = DEFAULT_PIPELINE,
    device: str | torch.device = "cpu",
    **options,
) -> CompiledModel:
    """Run `pipeline` on an IR module (e.g. parsed from a dump) with its weights."""
    manager = PassManager.parse(pipeline, **options)
    manager.run(module, weights)
    return CompiledModel(module, weights, pipeline, None, device, manager.report())


def load(
    directory: str | Path,
    device: str | torch.device = "cpu",
    *,
    trusted_ops: Iterable[str] = (),
    verify: bool = True,
) -> CompiledModel:
    """Load an artifact written by `CompiledModel.save` or `plait compile`.

    Loading imports no code from the artifact: custom ops its plan calls must
    be plait's own or come from the modules named in `trusted_ops` (imported
    here). `verify=False` skips checking the weights against their hashes.
    """
    contents, module, weights = artifact.read(directory, trusted_ops, verify)
    manifest = contents.manifest
    compiled = CompiledModel(
        module,
        weights,
        manifest["pipeline"],
        manifest["outputs"]["treespec"],
        device,
        generation=manifest["generation"],
    )
    compiled._directory = Path(directory)
    compiled.trusted_ops = tuple(trusted_ops)
    _check_programs(compiled, contents, Path(directory))
    return compiled


def load_on_rank(directory: str, *, trusted_ops: Iterable[str], verify: bool) -> CompiledModel:
    """A worker rank's model: the artifact its caller wrote, its program built
    (this rank's weights read) before the first call."""
    compiled = load(directory, trusted_ops=trusted_ops, verify=verify)
    _ = compiled.program
    return compiled


def _check_programs(compiled: CompiledModel, contents: artifact.Artifact, directory: Path) -> None:
    """Each rank file must be the program rebuilt from the plan for the
    artifact's own device type: the files are for reading, the plan is what runs."""
    saved_torch = contents.manifest["torch_version"]
    if saved_torch != torch.__version__:  # torch.fx's generated source differs by version
        warnings.warn(
            f"{directory} was saved with torch {saved_torch}, this is torch "
            f"{torch.__version__}: its rank*.py files are not checked against plan.mlir "
            "(their generated source may differ between torch versions); plait runs the "
            "programs it rebuilds from the plan",
            stacklevel=3,
        )
        return
    device = contents.manifest["device"]
    for rank, saved in sorted(contents.programs.items()):
        if saved != compiled.rank_code(rank, device):
            raise artifact.ArtifactError(
                f"{directory / artifact.program_file(rank)} does not match the program rebuilt "
                "from plan.mlir; the artifact was edited. Recompile it with `plait compile`"
            )


def _imported_libraries(module: ModuleOp) -> tuple[str, ...]:
    """The recorded custom-op libraries this process has imported (and so trusts)."""
    return tuple(n for n in libraries(module) if n in sys.modules and n != "__main__")


def _common_seed(in_group: bool) -> int:
    """A fresh sampling seed, rank 0's when the ranks share a process group."""
    seed = int(torch.randint(0, 2**62, ()))
    if in_group:
        import torch.distributed as dist

        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = box[0]
    return seed


def _joined(codes: dict[str, str]) -> str:
    """The source of a module's programs: one, or a section per function."""
    if len(codes) == 1:
        return next(iter(codes.values()))
    return "\n".join(f"# ---- @{name} ----{code}" for name, code in codes.items())


def _process_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _in_process_group() else 0


def _in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _weights_device(weights: WeightStore) -> torch.device:
    for name in weights.names():
        tensor = weights.get(name)
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


__all__ = [
    "CompiledModel",
    "compile",
    "compile_generation",
    "compile_ir",
    "load",
    "DEFAULT_PIPELINE",
]
