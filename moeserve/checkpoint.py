"""Memory-mapped access to the safetensors files of a checkpoint directory.

In:  a directory with `model.safetensors`, or shards listed by `model.safetensors.index.json`,
     or any `*.safetensors` files.
Out: `CheckpointTensors.get(name)`: a CPU tensor that is a zero-copy view into the mapped file.

The files are mapped copy-on-write and never read eagerly: a tensor's pages are only touched
when it is converted or used, so a checkpoint larger than RAM can be loaded tensor by tensor
and no second full copy of the weights ever exists.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moeserve.errors import ModelLoadError

_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class CheckpointTensors:
    """Name → tensor over all safetensors files of one directory, mapped lazily."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self._entries: dict[str, _TensorEntry] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        for file in _safetensors_files(model_dir):
            self._index_file(file)
        if not self._entries:
            raise ModelLoadError(f"{model_dir} contains no tensors; re-export the checkpoint with safetensors.")

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored (its dtype and shape), a view into the mapped file."""
        entry = self._entries[name]
        dtype = _SAFETENSORS_DTYPES.get(entry.dtype)
        if dtype is None:
            raise ModelLoadError(
                f"tensor {name!r} in {entry.file.name} has dtype {entry.dtype}, which moeserve cannot load; "
                f"convert the checkpoint to bf16, fp16 or fp32."
            )
        count = 1
        for dim in entry.shape:
            count *= dim
        if count == 0:
            return torch.empty(entry.shape, dtype=dtype)
        if entry.end - entry.start != count * dtype.itemsize:
            raise ModelLoadError(
                f"tensor {name!r} in {entry.file.name} has {entry.end - entry.start} bytes but shape "
                f"{list(entry.shape)} needs {count * dtype.itemsize}; the file is corrupt, re-export it."
            )
        flat = torch.frombuffer(self._map(entry.file), dtype=dtype, count=count, offset=entry.start)
        return flat.view(entry.shape)

    def get_adjacent(self, names: list[str]) -> torch.Tensor | None:
        """The named tensors concatenated along dim 0 as one view into the mapped file, when they lie
        back to back in one file with one dtype and the same trailing shape; otherwise None."""
        entries = [self._entries[name] for name in names]
        first = entries[0]
        for before, after in zip(entries, entries[1:]):
            if (after.file, after.dtype, after.shape[1:], after.start) != (first.file, first.dtype, first.shape[1:], before.end):
                return None
        dtype = _SAFETENSORS_DTYPES.get(first.dtype)
        if dtype is None or not first.shape or entries[-1].end - first.start == 0:
            return None
        rows = sum(entry.shape[0] for entry in entries)
        flat = torch.frombuffer(self._map(first.file), dtype=dtype, count=(entries[-1].end - first.start) // dtype.itemsize,
                                offset=first.start)
        return flat.view(rows, *first.shape[1:])

    def _map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            with open(file, "rb") as handle:
                # ACCESS_COPY: writable for torch.frombuffer, but private, so nothing is ever written back.
                self._maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[file]

    def _index_file(self, file: Path) -> None:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelLoadError(f"{file} is too short to be a safetensors file; re-download or re-export it.")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise ModelLoadError(f"{file} has a truncated header; re-download or re-export it.")
            try:
                header = json.loads(handle.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ModelLoadError(f"{file} has an unreadable header; re-download or re-export it.") from None
        data_start = 8 + header_len
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            if data_start + end > size:
                raise ModelLoadError(
                    f"tensor {name!r} runs past the end of {file.name} (the file is truncated); re-download it."
                )
            self._entries[name] = _TensorEntry(
                file=file,
                dtype=meta["dtype"],
                shape=tuple(meta["shape"]),
                start=data_start + begin,
                end=data_start + end,
            )


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise ModelLoadError(f"{index} has no readable 'weight_map'; re-export the checkpoint.") from None
        files = sorted({model_dir / shard for shard in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(
                f"{index.name} lists shard {missing[0]} which is not in {model_dir}; download the missing shards."
            )
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{model_dir} has no *.safetensors files; moeserve loads safetensors checkpoints only "
            f"(convert .bin weights with transformers' save_pretrained(safe_serialization=True))."
        )
    return files
