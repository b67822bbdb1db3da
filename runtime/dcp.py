"""Tensors from a torch Distributed Checkpoint (DCP) directory, read in this
process with no process group: `read_dcp(directory, shapes)`.

A DCP directory's `.metadata` is a pickle. It is read by an unpickler that
knows only DCP's own metadata classes, torch.Size, dtypes and layouts (any
other global is refused, so reading it runs no code the file names), and
only tensors are read, which DCP's reader loads with
torch.load(weights_only=True); DCP's non-tensor entries, pickles of
arbitrary objects, are never read.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoint import CheckpointError

_METADATA = ".metadata"
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self.path}: names '{module}.{name}', which is not one of torch Distributed "
            "Checkpoint's metadata classes; plait does not unpickle other objects. Convert "
            "the checkpoint with torch.distributed.checkpoint.format_utils.dcp_to_torch_save "
            "and load its state dict with torch.load(weights_only=True)"
        )


def read_dcp(directory: str | Path, shapes: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors `shapes` names (meta tensors: the shape and dtype each must
    have) from the DCP checkpoint in `directory`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = Path(directory)
    path = directory / _METADATA
    if not path.is_file():
        raise CheckpointError(
            f"{directory}: not a torch Distributed Checkpoint (no {_METADATA} file)"
        )

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f, path).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as exc:
                raise CheckpointError(f"{path}: cannot read DCP metadata: {exc}") from None
            if not isinstance(metadata, dcp.Metadata):
                raise CheckpointError(f"{path}: holds no DCP Metadata")
            metadata.storage_meta = metadata.storage_meta or dcp.StorageMeta()
            return metadata

    reader = Reader(directory)
    stored = reader.read_metadata().state_dict_metadata
    tensors = {}
    for name, like in shapes.items():
        entry = stored.get(name)
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(
                f"{directory}: holds no tensor '{name}' (it has {len(stored)} entries, e.g. "
                f"{', '.join(sorted(stored)[:3])}); the checkpoint does not match the model"
            )
        if tuple(entry.size) != tuple(like.shape) or entry.properties.dtype != like.dtype:
            raise CheckpointError(
                f"{directory}: tensor '{name}' is {list(entry.size)} {entry.properties.dtype}, "
                f"but the model's is {list(like.shape)} {like.dtype}"
            )
        tensors[name] = torch.empty(like.shape, dtype=like.dtype)
    with warnings.catch_warnings():  # that it reads in one process: what it is asked
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    return tensors
