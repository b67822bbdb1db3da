"""WeightStore: the weight data behind a program's `plait.param` names.

The IR holds no weight data. A store maps each parameter name to where its
tensor is: a tensor in memory (shared with the user's model, never copied), a
tensor in a safetensors file (read on first use, so a rank reads only what it
needs), or only a shape on `meta`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .attrs import shard
from .errors import PlaitError


def flat_piece(tensor: torch.Tensor, index: int, parts: int) -> torch.Tensor:
    """Piece `index` of `parts` of the tensor flattened and zero-padded to a
    multiple of `parts` (a `flat` placement's slice), as a new tensor."""
    whole = tensor.reshape(-1)
    size = -(-whole.numel() // parts)
    padded = torch.nn.functional.pad(whole, (0, size * parts - whole.numel()))
    return padded.narrow(0, index * size, size).clone()


class WeightError(PlaitError):
    """A weight that is missing, or cannot be materialized or saved."""


@dataclass
class _FileEntry:
    path: Path
    key: str


class TensorSource(Protocol):
    """A tensor stored elsewhere, e.g. in pieces over several files (a
    checkpoint the ranks wrote in parallel), that reads itself whole or a
    `(dim, index, parts, blocks)` slice of it."""

    def meta(self) -> torch.Tensor: ...

    def read(
        self, piece: tuple | None = None, flat: tuple[int, int] | None = None
    ) -> torch.Tensor: ...


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def _check_parts(
    name: str, shape: list[int], dim: int, parts: int, blocks: tuple[int, ...] | None = None
) -> None:
    sizes = (blocks or (shape[dim],)) if dim < len(shape) else ()
    if not sizes or sum(sizes) != shape[dim] or any(s % parts for s in sizes):
        as_blocks = f" as blocks {list(blocks)}" if blocks else ""
        raise WeightError(
            f"weight '{name}' of shape {tuple(shape)} cannot be split in {parts} along dim "
            f"{dim}{as_blocks}; the checkpoint does not match the plan"
        )


_CHUNK = 1 << 24  # bytes hashed at a time: memory stays bounded for any tensor size
_RECOPY = "copy the artifact again or recompile it"


def _extents(path: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's byte range in a safetensors file, from its header: an
    8-byte little-endian length, then JSON with offsets relative to the data."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        base = 8 + length
        return {
            key: (base + info["data_offsets"][0], base + info["data_offsets"][1])
            for key, info in header.items()
            if key != "__metadata__"
        }
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise WeightError(f"{path}: cannot read the safetensors header: {exc}") from None


def _digests(path: Path):
    """(key, hex digest of its bytes) for each tensor, in file order."""
    extents = _extents(path)
    with open(path, "rb") as f:
        for key, (start, end) in sorted(extents.items(), key=lambda item: item[1]):
            digest = hashlib.sha256()
            f.seek(start)
            while start < end:
                chunk = f.read(min(_CHUNK, end - start))
                if not chunk:
                    break  # a truncated file: the digest will not match
                digest.update(chunk)
                start += len(chunk)
            yield key, digest.hexdigest()


def tensor_digests(path: str | Path) -> dict[str, str]:
    """The sha256 of every tensor's bytes in a safetensors file."""
    return dict(_digests(Path(path)))


def check_digests(path: str | Path, expected: Mapping[str, str]) -> None:
    """Raise unless each tensor's bytes in the file hash to `expected[key]`
    (recorded when the file was written), tensor by tensor."""
    path = Path(path)
    found = set()
    for key, digest in _digests(path):
        if key not in expected:
            raise WeightError(f"{path}: tensor '{key}' has no recorded sha256; {_RECOPY}")
        if digest != expected[key]:
            raise WeightError(
                f"{path}: tensor '{key}' does not match the sha256 recorded when it was saved; "
                f"the file is corrupted: {_RECOPY}"
            )
        found.add(key)
    missing = sorted(set(expected) - found)
    if missing:
        raise WeightError(f"{path}: tensor '{missing[0]}' is missing from the file; {_RECOPY}")


class WeightStore:
    """Parameter name -> tensor, resolved lazily."""

    def __init__(self) -> None:
        self._entries: dict[str, torch.Tensor | _FileEntry | TensorSource] = {}

    # ---- filling -------------------------------------------------------

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Keep a reference to `tensor` (no copy) under `name`."""
        self._entries[name] = tensor.detach()

    def add_safetensors(self, path: str | Path, names: Iterable[str] | None = None) -> None:
        """Register tensors of a safetensors file, read when first used.

        Names the file stores once for several tied weights come back under
        every name (see `save`).
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                aliases = json.loads((f.metadata() or {}).get("plait.aliases", "{}"))
        except (OSError, SafetensorError, json.JSONDecodeError) as exc:
            raise WeightError(f"{path}: cannot read safetensors weights: {exc}") from None
        wanted = set(names) if names is not None else keys | set(aliases)
        for name in wanted:
            key = aliases.get(name, name)
            if key not in keys:
                raise WeightError(
                    f"weight '{name}' is not in {path}; the checkpoint does not match the model"
                )
            self._entries[name] = _FileEntry(path, key)

    def add_source(self, name: str, source: TensorSource) -> None:
        """Register a tensor that `source` reads when first used."""
        self._entries[name] = source

    # ---- reading -------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> torch.Tensor:
        entry = self._entries.get(name)
        if entry is None:
            raise WeightError(
                f"no weight named '{name}'; the program needs it (check the checkpoint "
                "or the model the program was compiled from)"
            )
        if isinstance(entry, _FileEntry):
            from safetensors import safe_open

            with safe_open(str(entry.path), framework="pt") as f:
                entry = f.get_tensor(entry.key)
            self._entries[name] = entry
        elif not isinstance(entry, torch.Tensor):
            entry = self._entries[name] = entry.read()
        return entry

    def get_shard(
        self, name: str, dim: int, index: int, parts: int, blocks: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """Slice `index` of `parts` equal slices along `dim` (with `blocks`, that
        slice of each block, joined), reading only those slices from a
        safetensors file."""
        entry = self._entries.get(name)
        if entry is not None and not isinstance(entry, (torch.Tensor, _FileEntry)):
            _check_parts(name, list(entry.meta().shape), dim, parts, blocks)
            return entry.read((dim, index, parts, blocks))
        if isinstance(entry, _FileEntry):
            from safetensors import safe_open

            with safe_open(str(entry.path), framework="pt") as f:
                view = f.get_slice(entry.key)
                shape = view.get_shape()
                _check_parts(name, shape, dim, parts, blocks)
                pieces = []
                for start, length in shard(dim, blocks).ranges(shape[dim], parts, index):
                    index_expr = [slice(None)] * len(shape)
                    index_expr[dim] = slice(start, start + length)
                    pieces.append(view[tuple(index_expr)])
                return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)
        full = self.get(name)
        _check_parts(name, list(full.shape), dim, parts, blocks)
        pieces = [
            full.narrow(dim, start, length)
            for start, length in shard(dim, blocks).ranges(full.shape[dim], parts, index)
        ]
        if len(pieces) > 1:
            return torch.cat(pieces, dim)
        return pieces[0] if full.is_meta else pieces[0].contiguous()

    def get_piece(
        self, name: str, shard: tuple | None, flat: tuple[int, int] | None
    ) -> torch.Tensor:
        """The weight's `shard` slice (dim, index, parts, blocks), then that
        slice's `flat` piece (index, parts; see `flat_piece`), each where given:
        a source that holds that very piece reads only it."""
        entry = self._entries.get(name)
        if (
            flat is not None
            and entry is not None
            and not isinstance(entry, (torch.Tensor, _FileEntry))
        ):
            return entry.read(shard, flat)
        tensor = self.get_shard(name, *shard) if shard else self.get(name)
        return flat_piece(tensor, *flat) if flat is not None else tensor

    def read(self, name: str, piece: tuple | None = None) -> torch.Tensor:
        """A fresh copy of the weight (or of its `(dim, index, parts[, blocks])` slice),
        not kept by the store: what streaming from the host tier reads."""
        entry = self._entries.get(name)
        if isinstance(entry, _FileEntry):  # get_shard and a whole-file read do not cache
            if piece is not None:
                return self.get_shard(name, *piece)
            from safetensors import safe_open

            with safe_open(str(entry.path), framework="pt") as f:
                return f.get_tensor(entry.key)
        if entry is not None and not isinstance(entry, torch.Tensor):
            return self.get_shard(name, *piece) if piece is not None else entry.read()
        tensor = self.get_shard(name, *piece) if piece is not None else self.get(name)
        return tensor if tensor.is_meta else tensor.clone()

    def as_meta(self) -> WeightStore:
        """The same names with shapes and dtypes only (no data read), e.g. to
        generate program source."""
        from safetensors import safe_open

        out = WeightStore()
        with ExitStack() as stack:
            files = {}  # path -> the file, opened once (its header is parsed on opening)
            for name, entry in self._entries.items():
                if isinstance(entry, _FileEntry):
                    if entry.path not in files:
                        files[entry.path] = stack.enter_context(
                            safe_open(str(entry.path), framework="pt")
                        )
                    view = files[entry.path].get_slice(entry.key)
                    dtype = _SAFETENSORS_DTYPES[view.get_dtype()]
                    out._entries[name] = torch.empty(view.get_shape(), dtype=dtype, device="meta")
                elif not isinstance(entry, torch.Tensor):
                    out._entries[name] = entry.meta()
                else:
                    out._entries[name] = entry.to("meta")
        return out

    def is_meta(self, name: str) -> bool:
        entry = self._entries.get(name)
        return isinstance(entry, torch.Tensor) and entry.is_meta

    def subset(self, names: Iterable[str]) -> WeightStore:
        """A store with only `names`, sharing this store's tensors."""
        out = WeightStore()
        for name in names:
            if name not in self._entries:
                self.get(name)  # raises the missing-weight error
            out._entries[name] = self._entries[name]
        return out

    # ---- writing -------------------------------------------------------

    def save(self, path: str | Path, names: Iterable[str] | None = None) -> None:
        """Write weights to one safetensors file; tied weights are stored once."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        aliases: dict[str, str] = {}
        by_storage: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
        for name in sorted(names if names is not None else self._entries):
            tensor = self.get(name)
            if tensor.is_meta:
                raise WeightError(
                    f"weight '{name}' is on the meta device and has no data to save; "
                    "load real weights (a checkpoint) before saving"
                )
            key = (
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tuple(tensor.shape),
                tuple(tensor.stride()),
                tensor.dtype,
            )
            if key in by_storage:
                aliases[name] = by_storage[key]
                continue
            by_storage[key] = name
            tensors[name] = tensor.contiguous().cpu()
        save_file(tensors, str(path), metadata={"plait.aliases": json.dumps(aliases)})
