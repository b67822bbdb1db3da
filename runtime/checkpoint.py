"""A training checkpoint's state, written by every rank at once: each rank its
own pieces of the whole tensors, and an index that reassembles them.

    DIR/state-rank0.safetensors, ...  each rank's pieces, under the tensors' names
    DIR/state-rank0.json, ...         what the rank wrote: pieces and their sha256
    DIR/state.json                    name -> shape, dtype, pieces [{file, shard, flat}]

A piece is a rank's slice `shard` = [dim, index, parts, blocks] of the whole
tensor (null: all of it), then, with `flat` = [index, parts], its piece of
that slice flattened and zero-padded (ZeRO's, see `ir.weights.flat_piece`).
A piece several ranks hold (replicated) is written once, by the lowest. A
reader sees whole tensors by name (`IndexedTensor`), and reads only the
slice it needs when a file holds exactly it (the same mesh resuming) or the
tensor is in one piece.

The index is data a stranger may write: every field is checked, and a
missing piece is reported by file and tensor.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..ir.attrs import shard as shard_placement
from ..ir.errors import PlaitError
from ..ir.weights import WeightStore, flat_piece, tensor_digests

INDEX = "state.json"
FORMAT = "plait-checkpoint-state"
DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
        torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}  # fmt: skip


class CheckpointError(PlaitError):
    """A checkpoint's state index that is malformed or misses a piece."""


@dataclass(frozen=True)
class Piece:
    """One tensor of a rank's part of the state."""

    name: str
    tensor: torch.Tensor
    shard: tuple | None = None  # (dim, index, parts, blocks)
    flat: tuple[int, int] | None = None  # (index, parts)


def rank_file(rank: int) -> str:
    return f"state-rank{rank}.safetensors"


def _listing(rank: int) -> str:
    return f"state-rank{rank}.json"


# ---- writing -------------------------------------------------------------


def write_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def write_pieces(directory: Path, rank: int, pieces: list[Piece]) -> None:
    """A rank's pieces into `directory`: its safetensors file, then the listing
    that says what it holds (the last file a rank writes: its presence says
    the rank finished)."""
    directory = Path(directory)
    path = directory / rank_file(rank)
    write_file(path, {p.name: p.tensor.detach().contiguous().cpu() for p in pieces})
    flush(path)  # here, by the rank (its writer thread when asynchronous), not at the end
    listing = {
        "pieces": [
            {
                "name": p.name,
                "dtype": str(p.tensor.dtype).removeprefix("torch."),
                "shape": list(p.tensor.shape),
                "shard": _json_shard(p.shard),
                "flat": list(p.flat) if p.flat is not None else None,
            }
            for p in pieces
        ],
        "sha256": tensor_digests(path),
    }
    (directory / _listing(rank)).write_text(json.dumps(listing))


def flush(path: Path) -> None:
    """Put a file's bytes on disk (fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_shard(shard: tuple | None) -> list | None:
    if shard is None:
        return None
    dim, index, parts, blocks = shard
    return [dim, index, parts, list(blocks) if blocks else None]


def write_index(directory: Path, ranks: int, shapes: dict[str, list[int]]) -> dict:
    """Merge the ranks' listings into the index (`shapes`: each tensor's whole
    shape, where a piece is not the whole tensor); returns the sha256 of every
    rank file's tensors, for the manifest."""
    tensors: dict[str, dict] = {}
    hashes = {}
    for rank in range(ranks):
        listing = json.loads((directory / _listing(rank)).read_text())
        if listing["pieces"]:
            hashes[rank_file(rank)] = listing["sha256"]
        for piece in listing["pieces"]:
            entry = tensors.setdefault(
                piece["name"],
                {"shape": _whole_shape(piece, shapes), "dtype": piece["dtype"], "pieces": []},
            )
            entry["pieces"].append(
                {"file": rank_file(rank), "shard": piece["shard"], "flat": piece["flat"]}
            )
        (directory / _listing(rank)).unlink()
    for rank in range(ranks):  # a rank file with no pieces is not part of the checkpoint
        if rank_file(rank) not in hashes:
            (directory / rank_file(rank)).unlink(missing_ok=True)
    index = {"format": FORMAT, "version": 1, "tensors": tensors}
    (directory / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return hashes


# ---- reading -------------------------------------------------------------


def add_indexed(weights: WeightStore, directory: Path, files: set[str]) -> set[str]:
    """Register every tensor of the index in `directory` with `weights`;
    `files`: the files the manifest hashes (the only ones a piece may name).
    Returns the names."""
    path = Path(directory) / INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the state index: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a plait checkpoint's state index")
    tensors = index.get("tensors")
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: field 'tensors' must be an object")
    for name, entry in tensors.items():
        weights.add_source(name, IndexedTensor.checked(Path(directory), name, entry, files))
    return set(tensors)


def _ints(value, length: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and (length is None or len(value) == length)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


@dataclass
class IndexedTensor:
    """A whole tensor of the index, read from its pieces (a `TensorSource`)."""

    directory: Path
    name: str
    shape: list[int]
    dtype: torch.dtype
    pieces: list[dict]  # {file, shard, flat}, checked

    @classmethod
    def checked(cls, directory: Path, name: str, entry, files: set[str]) -> IndexedTensor:
        where = f"{directory / INDEX}: tensor '{name}'"
        if not isinstance(entry, dict) or not _ints(entry.get("shape")):
            raise CheckpointError(f"{where}: 'shape' must be a list of sizes")
        if entry.get("dtype") not in DTYPES:
            raise CheckpointError(f"{where}: 'dtype' must be one of {', '.join(DTYPES)}")
        pieces = entry.get("pieces")
        if not isinstance(pieces, list) or not pieces:
            raise CheckpointError(f"{where}: 'pieces' must be a non-empty list")
        shape = entry["shape"]
        for piece in pieces:
            if not isinstance(piece, dict) or piece.get("file") not in files:
                raise CheckpointError(
                    f"{where}: a piece names a file the manifest does not hash "
                    f"({str(piece)[:60]}); save the checkpoint again"
                )
            shard, flat = piece.get("shard"), piece.get("flat")
            if shard is not None and not (
                isinstance(shard, list)
                and len(shard) == 4
                and _ints(shard[:3])
                and shard[0] < len(shape)
                and shard[1] < shard[2]
                and (shard[3] is None or _ints(shard[3]))
            ):
                raise CheckpointError(f"{where}: 'shard' must be [dim, index, parts, blocks]")
            if flat is not None and not (_ints(flat, 2) and flat[0] < flat[1]):
                raise CheckpointError(f"{where}: 'flat' must be [index, parts]")
        tensor = cls(directory, name, shape, DTYPES[entry["dtype"]], pieces)
        tensor._check_complete(where)
        return tensor

    def _groups(self) -> dict[tuple, list[dict]]:
        """The pieces by the slice they are (or are flat pieces of)."""
        groups: dict[tuple, list[dict]] = {}
        for piece in self.pieces:
            shard = piece["shard"]
            key = None if shard is None else (shard[0], shard[1], shard[2], _blocks(shard))
            groups.setdefault(key, []).append(piece)
        return groups

    def _check_complete(self, where: str) -> None:
        groups = self._groups()
        slices = [k for k in groups if k is not None]
        if None not in groups:
            layouts = {(dim, parts, blocks) for dim, _, parts, blocks in slices}
            indices = sorted(k[1] for k in slices)
            if len(layouts) != 1 or indices != list(range(slices[0][2])):
                raise CheckpointError(
                    f"{where}: its pieces do not cover the tensor (slices {indices}); "
                    "a rank's file is missing: save the checkpoint again"
                )
            dim, parts, blocks = layouts.pop()
            sizes = blocks or (self.shape[dim],)
            if sum(sizes) != self.shape[dim] or any(s % parts for s in sizes):
                raise CheckpointError(f"{where}: dim {dim} does not split in {parts} slices")
        for key, pieces in groups.items():
            flats = [p["flat"] for p in pieces]
            complete = flats == [None] or (
                None not in flats
                and len({f[1] for f in flats}) == 1
                and sorted(f[0] for f in flats) == list(range(flats[0][1]))
            )
            if not complete:
                raise CheckpointError(
                    f"{where}: its flat pieces of slice {key} are incomplete or repeated; "
                    "save the checkpoint again"
                )

    def meta(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    def read(self, piece: tuple | None = None, flat: tuple[int, int] | None = None) -> torch.Tensor:
        if flat is not None:  # a file holds this very piece (ZeRO resuming on its mesh)
            held = self._groups().get(_key(piece), [])
            exact = [p for p in held if p["flat"] == list(flat)]
            if not exact:
                return flat_piece(self.read(piece), *flat)
            numel = math.prod(self.shape) // (piece[2] if piece is not None else 1)
            return self._checked(self._tensor(exact[0]), [-(-numel // flat[1])], exact[0])
        groups = self._groups()
        key = _key(piece)
        if key in groups and all(p["flat"] is None for p in groups[key]):
            return self._slice(key, groups[key])  # the file holds exactly this slice
        if None in groups and all(p["flat"] is None for p in groups[None]) and piece is not None:
            return self._from_whole_file(groups[None][0], piece)
        whole = torch.empty(self.shape, dtype=self.dtype)
        for key, pieces in groups.items():
            local = self._slice(key, pieces)
            if key is None:
                whole.copy_(local)
                continue
            dim, index, parts, blocks = key
            offset = 0
            for start, length in shard_placement(dim, blocks or None).ranges(
                self.shape[dim], parts, index
            ):
                whole.narrow(dim, start, length).copy_(local.narrow(dim, offset, length))
                offset += length
        if piece is None:
            return whole
        dim, index, parts, blocks = piece
        ranges = shard_placement(dim, blocks).ranges(self.shape[dim], parts, index)
        return torch.cat([whole.narrow(dim, s, n) for s, n in ranges], dim)

    def _slice(self, key: tuple | None, pieces: list[dict]) -> torch.Tensor:
        """The slice `key` (None: the whole tensor), from its one piece or its flat pieces."""
        shape = list(self.shape)
        if key is not None:
            shape[key[0]] //= key[2]
        if pieces[0]["flat"] is None:
            return self._checked(self._tensor(pieces[0]), shape, pieces[0])
        ordered = sorted(pieces, key=lambda p: p["flat"][0])
        flat = torch.cat([self._tensor(p).reshape(-1) for p in ordered])
        numel = math.prod(shape)
        if flat.numel() < numel:
            raise CheckpointError(
                f"{self.directory / INDEX}: the flat pieces of '{self.name}' hold "
                f"{flat.numel()} elements, fewer than its slice's {numel}; save it again"
            )
        return flat[:numel].reshape(shape)

    def _tensor(self, piece: dict) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.directory / piece["file"]), framework="pt") as f:
            if self.name not in f.keys():
                raise CheckpointError(
                    f"{self.directory / piece['file']}: tensor '{self.name}' is missing; "
                    "the index does not match the file: save the checkpoint again"
                )
            return f.get_tensor(self.name)

    def _from_whole_file(self, piece: dict, wanted: tuple) -> torch.Tensor:
        """A slice of a tensor one file holds whole, reading only that slice."""
        from safetensors import safe_open

        dim, index, parts, blocks = wanted
        with safe_open(str(self.directory / piece["file"]), framework="pt") as f:
            view = f.get_slice(self.name)
            if list(view.get_shape()) != self.shape:
                self._checked(torch.empty(view.get_shape(), device="meta"), self.shape, piece)
            out = []
            for start, length in shard_placement(dim, blocks).ranges(self.shape[dim], parts, index):
                where = [slice(None)] * len(self.shape)
                where[dim] = slice(start, start + length)
                out.append(view[tuple(where)])
        return out[0] if len(out) == 1 else torch.cat(out, dim)

    def _checked(self, tensor: torch.Tensor, shape: list[int], piece: dict) -> torch.Tensor:
        if list(tensor.shape) != shape or (not tensor.is_meta and tensor.dtype != self.dtype):
            raise CheckpointError(
                f"{self.directory / piece['file']}: tensor '{self.name}' is "
                f"{list(tensor.shape)} {tensor.dtype}, but the index says its piece is {shape} "
                f"{self.dtype}; save the checkpoint again"
            )
        return tensor


def _blocks(shard: list) -> tuple[int, ...]:
    return tuple(shard[3] or ())


def _whole_shape(piece: dict, shapes: dict[str, list[int]]) -> list[int]:
    if piece["name"] in shapes:
        return shapes[piece["name"]]
    if piece["shard"] is None and piece["flat"] is None:
        return piece["shape"]
    raise CheckpointError(
        f"state '{piece['name']}' is split over the ranks, but the captured step has no "
        "tensor of that name to give its whole shape; a pass renamed it"
    )


def _key(piece: tuple | None) -> tuple | None:
    """A requested slice (dim, index, parts, blocks) as the index groups its pieces."""
    return None if piece is None else (piece[0], piece[1], piece[2], tuple(piece[3] or ()))
