"""This process's place on a device mesh, from torch.distributed.

Ranks are laid out row-major over the mesh axes (the last axis varies
fastest), and each axis gets a process group joining the ranks that differ
only along it. Every rank must call `mesh_groups` with the same mesh.
"""

from __future__ import annotations

import itertools

import torch.distributed as dist

from ..backends.fx import CollectiveGroups, mesh_coords
from ..ir.errors import PlaitError


class MeshError(PlaitError):
    pass


def mesh_groups(mesh: dict[str, int]) -> CollectiveGroups:
    size = 1
    for n in mesh.values():
        size *= n
    if not dist.is_available() or not dist.is_initialized():
        raise MeshError(
            f"this plan runs on {size} ranks (mesh {mesh}); launch it with torchrun "
            f"(torchrun --nproc-per-node {size} ...) or `plait run DIR --nproc {size}`"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != size:
        raise MeshError(
            f"the plan's mesh {mesh} has {size} ranks but {world} processes were started"
        )
    axes = list(mesh)
    names = {}
    for i, axis in enumerate(axes):
        if len(axes) == 1:
            names[axis] = dist.group.WORLD.group_name
            break
        others = [range(mesh[a]) for a in axes if a != axis]
        for fixed in itertools.product(*others):  # every rank creates every group, in order
            members = []
            for k in range(mesh[axis]):
                coord = list(fixed)
                coord.insert(i, k)
                members.append(_rank_of(coord, mesh))
            group = dist.new_group(members)
            if rank in members:
                names[axis] = group.group_name
    return CollectiveGroups(names, dict(mesh), mesh_coords(mesh, rank))


def _rank_of(coord: list[int], mesh: dict[str, int]) -> int:
    rank = 0
    for c, n in zip(coord, mesh.values()):
        rank = rank * n + c
    return rank
