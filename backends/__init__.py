"""Backends: plait IR -> something that runs. `fx` builds the per-rank torch
program (and runs it with observers for activation statistics); `mlir`
hands it to torch-mlir. Runtime objects a program uses (the weight
prefetcher) come from the caller.
"""
