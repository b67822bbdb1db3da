"""Passes over plait IR: what a pass is (`base`: a frozen dataclass with typed
`options`), the pipeline text parser (`pipeline`), the pass `registry` and
`manager`. The generic passes sit here (canonicalize, cse, dce, overlap,
ladder with its `residual` and `whole` analyses); the rooms below hold the
rest: `shard/`, `compress/` (quantize, sparsify), `memory/` (memplan, tier).
Passes read the cost model (`plait.cost`) but never a backend: a pass that
runs the program gets the runner through its `PassContext`.
"""
