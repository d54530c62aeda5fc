"""Reading DCP checkpoints without running code from them: torch's reader unpickles `.metadata` and its planner
unpickles non-tensor values with `weights_only=False`, so a planted pickle in a run folder would run on resume.

Here `.metadata` goes through an unpickler that admits only the classes torch itself writes there (the dataclasses of
torch.distributed.checkpoint.metadata, torch.Size, dtypes, layouts, paths), and non-tensor values through
`torch.load(weights_only=True)`. Anything else is an LmforgeError naming the file.
"""

from __future__ import annotations

import enum
import io
import pickle
import types
from pathlib import Path, PurePath
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem

from lmforge.errors import LmforgeError

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
# (module, name) pairs a .metadata pickle written by torch 2.x refers to; each is a plain data class or a lookup of a
# constant (torch.serialization._get_layout maps "torch.strided" to the layout), so building them runs no user code
ALLOWED = {
    (_METADATA_MODULE, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class Refused(pickle.UnpicklingError):
    """A pickle that names something checkpoint metadata never holds."""


class _MetadataUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, so that BUILD can be checked too: setting attributes on an admitted class, function
    or enum member (rather than on a fresh instance) would patch torch for the rest of the process."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def _build(self) -> None:
        if isinstance(self.stack[-2], type | types.FunctionType | types.BuiltinFunctionType | enum.Enum):
            raise Refused(f"it sets attributes of {self.stack[-2]!r}, which checkpoint metadata never does")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _build

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise Refused(f"it refers to {module}.{name}, which is not checkpoint metadata")

    def persistent_load(self, pid: Any) -> Any:
        raise Refused("it holds a persistent id, which checkpoint metadata never has")


def read_metadata(path: Path) -> Metadata:
    """The DCP index at `path` (a `.metadata` file), refusing any pickle that is not plain checkpoint metadata."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Refused as e:
        raise LmforgeError(
            f"{path} is not DCP metadata that lmforge wrote ({e}); refusing to load it: delete that checkpoint folder "
            "and resume from an earlier one"
        ) from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        # a missing or truncated file (an interrupted copy), or bytes that are no pickle at all
        raise LmforgeError(f"{path.parent} is not a complete DCP checkpoint ({e!r}); load an earlier one") from None
    problem = _structure_problem(metadata)
    if problem:
        raise LmforgeError(
            f"{path} is not DCP metadata that lmforge wrote ({problem}); delete that checkpoint folder and resume "
            "from an earlier one"
        )
    return metadata


def _structure_problem(metadata: Any) -> str | None:
    """What is wrong with an unpickled index, or None; a shard path must name a file in the checkpoint folder."""
    if not isinstance(metadata, Metadata):
        return f"it holds a {type(metadata).__name__}, not a Metadata"
    entries = metadata.state_dict_metadata
    if not isinstance(entries, dict) or not all(
        isinstance(k, str) and isinstance(v, TensorStorageMetadata | BytesStorageMetadata) for k, v in entries.items()
    ):
        return "its state_dict_metadata is not a table of tensor and bytes entries"
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        return "its storage_data is not a table"
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            return "its storage_data holds entries of the wrong kind"
        name = info.relative_path
        if not isinstance(name, str) or PurePath(name).name != name or name in ("", ".", ".."):
            return f"shard path {name!r} is not a file name inside the checkpoint folder"
        if info.transform_descriptors:
            return f"shard {name} names stream transforms {info.transform_descriptors}, which lmforge never writes"
    if metadata.storage_meta is not None and not isinstance(metadata.storage_meta, StorageMeta):
        return "its storage_meta is not a StorageMeta"
    return None


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata comes through read_metadata above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor values (optimizer hyperparameters) load with weights_only=True."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise LmforgeError(
                f"checkpoint value {read_item.dest_index.fqn} is not plain data ({str(e).splitlines()[0]}); "
                "refusing to load it: delete that checkpoint folder and resume from an earlier one"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
