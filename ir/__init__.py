"""plait's IR: the `plait` xDSL dialect (`dialect`, `types`, `attrs`, `ops`,
`args`), its text form (`text`, with the verifier's type inference in
`typecheck`), symbolic sizes (`symbolic`) and the weights a program binds
(`weights`). Facts about the IR that passes, the cost model and backends all
read live here too: the `mem` attribute (`memory`), which ops update state
(`effects`), compressed-linear targets (`targets`), the custom-op libraries a
program needs (`libraries`). The lowest room: it imports no other.
"""
