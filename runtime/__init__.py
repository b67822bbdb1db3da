"""Running compiled programs: artifact directories (`artifact`, `manifest`),
call-time input checks (`inputs`), output structures (`outputs`), mesh
process groups (`distributed`, `launch`), local worker ranks (`workers`,
`rank_worker`, `heartbeat`), the decoding loop (`generate`), weight
prefetching (`prefetch`), per-op profiles (`profile`), and measuring the
machine for the cost model (`calibrate`). Worker ranks load artifacts with
the function their caller names, so nothing here imports `plait.api`.
"""
