"""Memory: where a program's tensors live.

`memplan` places activations at offsets in one arena (`liveness` of the
program's buffers, then `arena`'s best-of greedy and exact placements);
`tier` keeps weights within a device budget by streaming the rest from the
host (`tiering` picks them with the cost model's op times); `offload` keeps a
training step's optimizer state in host memory and runs its update there.
"""
