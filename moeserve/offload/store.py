"""The compressed host store: every routed expert encoded per the policy, one packed buffer each.

In:  the checkpoint's stored expert tensors (memory-mapped, any dtype, or MXFP4 blocks and scales)
     and a resolved policy.
Out: `PackedExpert`s in host memory (page-locked when a GPU serves; one exact-size arena per MoE
     layer, host_memory.py), each one contiguous uint8 range holding its gate, up and down blobs at
     8-byte-aligned offsets, so one copy moves one expert and a device-side decoder can read each
     blob in place.

Owned by the host for the whole run and never written after it is built: evicting a decoded
expert never writes back. `save` / `load` keep it on disk (one file, every blob checksummed).
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from moeserve.codecs import Blob, encode
from moeserve.codecs.mxfp4 import Mxfp4Tensor, blob_of
from moeserve.errors import ModelLoadError
from moeserve.experts import ExpertWeights, Mxfp4ExpertWeights
from moeserve.offload.host_memory import HostArena
from moeserve.offload.policy import PROJECTIONS, ResolvedPolicy, TensorSetting

ExpertKey = tuple[int, int]  # (layer, expert)
_ALIGN = 8  # device decoders read blob payloads as 64-bit words
_MAGIC = b"MSSTORE1"


@dataclass(frozen=True)
class PackedExpert:
    data: torch.Tensor  # uint8 [nbytes]: the three payloads, aligned
    blobs: tuple[Blob, Blob, Blob]  # gate, up, down; payloads are views into `data`
    offsets: tuple[int, int, int]  # byte offset of each payload in `data`
    arena: HostArena | None = field(default=None, repr=False, compare=False)  # holds `data`'s memory

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def numel(self) -> int:
        return sum(b.numel for b in self.blobs)


def pack_experts(encoded: list[tuple[Blob, Blob, Blob]], pin: bool = False) -> list[PackedExpert]:
    """Experts (their gate, up and down blobs) packed one after another into one host arena of exactly their
    size (pinned when a GPU copies from it)."""
    layouts, end = [], 0
    for blobs in encoded:
        offsets = []
        for blob in blobs:
            offsets.append(end)
            end = _aligned(end + blob.payload_nbytes)
        layouts.append(offsets)
    arena = HostArena(end, pin)
    host = arena.data.numpy()
    packed = []
    for blobs, offsets in zip(encoded, layouts):
        placed = []
        for blob, offset in zip(blobs, offsets):
            n = blob.payload_nbytes
            host[offset : offset + n] = blob.payload_numpy()
            placed.append(blob.with_payload(host[offset : offset + n]))
        first, last = offsets[0], _aligned(offsets[-1] + blobs[-1].payload_nbytes)
        packed.append(
            PackedExpert(
                data=arena.data[first:last],
                blobs=tuple(placed),
                offsets=tuple(o - first for o in offsets),
                arena=arena,
            )
        )
    return packed


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


@dataclass
class LayerSize:
    nbytes: int = 0  # compressed bytes, headers included
    numel: int = 0

    @property
    def bits_per_value(self) -> float:
        return 8 * self.nbytes / self.numel if self.numel else 0.0


class CompressedStore:
    def __init__(self, experts: dict[ExpertKey, PackedExpert], policy_yaml: str, fingerprint: str):
        self.experts = experts
        self.policy_yaml = policy_yaml
        self.fingerprint = fingerprint

    @classmethod
    def build(
        cls,
        stored: Iterator[tuple[int, list[ExpertWeights] | list[Mxfp4ExpertWeights]]],
        policy: ResolvedPolicy,
        policy_yaml: str,
        total: int,
        pin: bool = False,
        progress: bool = True,
    ) -> CompressedStore:
        """Encode every expert (`total` of them, for the progress bar) from the stored tensors."""
        experts: dict[ExpertKey, PackedExpert] = {}
        with tqdm(total=total, desc="compressing experts", unit="expert", disable=not progress) as bar:
            for layer, weights in stored:
                encoded = []
                for expert, w in enumerate(weights):
                    blobs = []
                    for projection, tensor in zip(PROJECTIONS, (w.gate, w.up, w.down)):
                        blobs.append(_encode_stored(tensor, policy.setting(layer, expert, projection)))
                    encoded.append(tuple(blobs))
                    bar.update()
                # one arena per layer: exact size, and at most one layer's blobs held twice while packing
                for expert, packed in enumerate(pack_experts(encoded, pin)):
                    experts[(layer, expert)] = packed
        return cls(experts, policy_yaml, policy.fingerprint())

    def layer_sizes(self) -> dict[int, LayerSize]:
        sizes: dict[int, LayerSize] = {}
        for (layer, _), packed in sorted(self.experts.items()):
            size = sizes.setdefault(layer, LayerSize())
            size.nbytes += sum(b.nbytes for b in packed.blobs)
            size.numel += packed.numel
        return sizes

    @property
    def nbytes(self) -> int:
        """Host memory held by the store: its arenas, alignment padding included."""
        arenas = {id(p.arena): p.arena.nbytes for p in self.experts.values() if p.arena is not None}
        return sum(arenas.values()) + sum(p.nbytes for p in self.experts.values() if p.arena is None)

    def save(self, path: Path) -> None:
        """One file: magic, index length, JSON index (per expert: layer, expert, offset, blob lengths), then each
        expert's three serialized blobs."""
        index, chunks, offset = [], [], 0
        for (layer, expert), packed in sorted(self.experts.items()):
            parts = [bytes(b) for b in packed.blobs]
            index.append([layer, expert, offset, [len(p) for p in parts]])
            chunks.extend(parts)
            offset += sum(len(p) for p in parts)
        header = json.dumps({"policy_fingerprint": self.fingerprint, "policy": self.policy_yaml, "experts": index})
        tmp = path.with_suffix(path.suffix + ".partial")
        with open(tmp, "wb") as out:
            out.write(_MAGIC + struct.pack("<Q", len(header)) + header.encode())
            for chunk in chunks:
                out.write(chunk)
        tmp.replace(path)  # a crash mid-write never leaves a store that looks complete

    @classmethod
    def load(cls, path: Path, pin: bool = False, progress: bool = True) -> CompressedStore:
        with open(path, "rb") as handle:
            # Read-only map; it closes itself once the last blob view into it is packed and dropped.
            mapped = memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
        if bytes(mapped[: len(_MAGIC)]) != _MAGIC:
            raise ModelLoadError(f"{path} is not a moeserve compressed store; recreate it with `moeserve compress`.")
        (header_len,) = struct.unpack_from("<Q", mapped, len(_MAGIC))
        start = len(_MAGIC) + 8
        header = json.loads(bytes(mapped[start : start + header_len]))
        data = mapped[start + header_len :]
        by_layer: dict[int, list[tuple[int, tuple[Blob, Blob, Blob]]]] = {}
        # an older store adds a fifth field per expert (whether the checkpoint kept gate and up apart), read past:
        # every slot now serves gate and up fused
        for layer, expert, offset, lengths, *_ in tqdm(
            header["experts"], desc="loading compressed experts", unit="expert", disable=not progress
        ):
            blobs, at = [], offset
            for n in lengths:
                if at + n > len(data):
                    raise ModelLoadError(f"{path} is truncated; recreate it with `moeserve compress`.")
                blobs.append(Blob.from_bytes(data[at : at + n]))
                at += n
            by_layer.setdefault(layer, []).append((expert, tuple(blobs)))
        experts = {}
        for layer, entries in by_layer.items():
            for (expert, _), packed in zip(entries, pack_experts([e for _, e in entries], pin)):
                experts[(layer, expert)] = packed
        return cls(experts, header["policy"], header["policy_fingerprint"])


def _encode_stored(tensor: torch.Tensor | Mxfp4Tensor, setting: TensorSetting) -> Blob:
    """An MXFP4 tensor under the mxfp4 codec keeps its bytes; under any other codec it is dequantized
    (as transformers does) and encoded from there."""
    if isinstance(tensor, Mxfp4Tensor):
        if setting.codec == "mxfp4":
            return blob_of(tensor)
        tensor = tensor.dequantize()
    return encode(tensor, setting.codec, setting.mode, setting.error_bound)


def packed_payload_view(packed: PackedExpert, device_data: torch.Tensor) -> tuple[Blob, Blob, Blob]:
    """The expert's blobs with payloads pointing into a device copy of its packed buffer."""
    return tuple(
        blob.with_payload(device_data[offset : offset + blob.payload_nbytes])
        for blob, offset in zip(packed.blobs, packed.offsets)
    )

