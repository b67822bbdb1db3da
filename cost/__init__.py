"""The cost model: what a plan costs on a machine, predicted.

Per op: FLOPs, bytes and alpha-beta communication as sympy formulas of the
size symbols (`op_cost`, `comm_cost`), memory orders that make a reshape copy
(`layout`); per program: a two-lane schedule simulation with async overlap
(`schedule`), `estimate` and its tables (`estimate_report`); z3 proofs that a
size formula holds over its whole range (`bounds`). It reads the IR and the
machine descriptions (`plait.hardware`); passes that optimize for time or
memory (shard's ILP, tier) call it.
"""
