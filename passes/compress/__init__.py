"""Weight compression: the `quantize` and `sparsify` passes and their math.

`quantize` (EasyQuant or round-to-nearest, `easyquant`; bits per layer under
a size budget, `bit_allocation`) and `sparsify` (GQSA group sparsity,
`gqsa`, optionally weighing weights by `activation_stats`, the norms of
each layer's inputs over sample inputs) replace linear layers with calls to
compressed kernels through `linear_rewrite`.
"""
