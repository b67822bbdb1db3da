"""Sharding: the `shard` pass and what it decides with.

`shard` rewrites a program into its per-rank (SPMD) form; `rules` says how
placements flow through each op family (Megatron's pairing, one rule per op
class); `ilp` chooses every op's strategy among the rules' with one integer
program over the cost model (Alpa's formulation); `experts` finds the expert
MLPs of mixture-of-experts layers, which split by expert.
"""
