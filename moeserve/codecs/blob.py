"""Blob: one encoded tensor, self-describing, and its byte format (version 1).

In: a codec's payload and what decode needs: codec name, dtype, shape, bound mode, the bound as given and
resolved to an absolute value. Out: `bytes(blob)` = header + payload, with a CRC-32 over both, and
`Blob.from_bytes`, which checks magic, version, sizes and the CRC before any codec reads the payload.

Header (little-endian): magic "MSCB" | version u16 | header bytes u16 | codec 16 s | dtype u8 | mode u8 |
ndim u8 | 0 u8 | error_bound f64 | abs_bound f64 | payload bytes u64 | crc32 u32 | 0 u32 | shape ndim x u64.
Unbounded codecs store NaN bounds and mode "none".
"""

from __future__ import annotations

import dataclasses
import math
import struct
import warnings
import zlib

import numpy as np
import torch

from moeserve.codecs.base import CodecError

MAGIC = b"MSCB"
VERSION = 1
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # index = dtype code, shared with szp_format.h
MODES = ("none", "abs", "rel", "mean_abs")
_FIXED = struct.Struct("<4sHH16sBBBBddQII")


@dataclasses.dataclass(frozen=True)
class Blob:
    codec: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    mode: str  # one of MODES; "none" for unbounded codecs
    error_bound: float | None  # as the caller gave it
    abs_bound: float | None  # the absolute bound the codec guaranteed (rel/mean_abs resolved at encode time)
    payload: np.ndarray | torch.Tensor  # 1-D uint8; a torch tensor once relocated (pinned host or device)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return _FIXED.size + 8 * len(self.shape) + self.payload_nbytes

    @property
    def payload_nbytes(self) -> int:
        return int(self.payload.nbytes) if isinstance(self.payload, np.ndarray) else self.payload.numel()

    @property
    def bits_per_value(self) -> float:
        """All bytes of the blob, header included, per value of the tensor."""
        return 8 * self.nbytes / max(self.numel, 1)

    def payload_numpy(self) -> np.ndarray:
        """The payload as a host uint8 array (a view when it already is one)."""
        if isinstance(self.payload, np.ndarray):
            return self.payload
        return self.payload.cpu().numpy()

    def payload_tensor(self) -> torch.Tensor:
        """The payload as a CPU uint8 tensor (a view of a host payload). Callers only read it."""
        if isinstance(self.payload, torch.Tensor):
            return self.payload.cpu()
        with warnings.catch_warnings():  # from_bytes payloads are read-only views; nothing writes to them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(self.payload)

    def with_payload(self, payload: np.ndarray | torch.Tensor) -> Blob:
        """The same blob with its payload moved, e.g. into pinned host memory or onto a device."""
        if payload.dtype not in (np.uint8, torch.uint8) or payload.ndim != 1 or len(payload) != self.payload_nbytes:
            raise CodecError(f"a relocated payload must be 1-D uint8 of {self.payload_nbytes} bytes; copy it whole.")
        return dataclasses.replace(self, payload=payload)

    def _header(self, crc: int) -> bytes:
        fixed = _FIXED.pack(
            MAGIC, VERSION, _FIXED.size + 8 * len(self.shape), self.codec.encode("ascii"),
            DTYPES.index(self.dtype), MODES.index(self.mode), len(self.shape), 0,
            _or_nan(self.error_bound), _or_nan(self.abs_bound), self.payload_nbytes, crc, 0,
        )  # fmt: skip
        return fixed + struct.pack(f"<{len(self.shape)}Q", *self.shape)

    def __bytes__(self) -> bytes:
        payload = self.payload_numpy()
        crc = zlib.crc32(payload, zlib.crc32(self._header(0)))
        return self._header(crc) + payload.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Blob:
        """Parses and verifies a blob; the payload is a read-only view of `data`, not a copy."""
        view = memoryview(data).cast("B")
        if len(view) < _FIXED.size or bytes(view[:4]) != MAGIC:
            raise CodecError("these bytes are not a moeserve codec blob (bad magic); pass bytes made by bytes(blob).")
        magic, version, head_len, codec, dtype, mode, ndim, _, eb, abs_eb, n_payload, crc, _ = _FIXED.unpack_from(view)
        if version != VERSION:
            raise CodecError(f"this blob has format version {version}, this moeserve reads {VERSION}; re-encode it.")
        if head_len != _FIXED.size + 8 * ndim or len(view) != head_len + n_payload:
            raise CodecError(
                f"this blob is {len(view)} bytes but its header describes {head_len + n_payload}; it is truncated or "
                "padded, so re-read or re-encode it."
            )
        payload = np.frombuffer(view, dtype=np.uint8, offset=head_len)
        header = bytearray(view[:head_len])
        struct.pack_into("<I", header, _FIXED.size - 8, 0)
        if zlib.crc32(payload, zlib.crc32(header)) != crc:
            raise CodecError("this blob fails its checksum (corrupted bytes); re-read or re-encode it.")
        if dtype >= len(DTYPES) or mode >= len(MODES):
            raise CodecError("this blob records an unknown dtype or bound mode; re-encode it with this moeserve.")
        return cls(
            codec=codec.rstrip(b"\0").decode("ascii"),
            dtype=DTYPES[dtype],
            shape=struct.unpack_from(f"<{ndim}Q", view, _FIXED.size),
            mode=MODES[mode],
            error_bound=None if math.isnan(eb) else eb,
            abs_bound=None if math.isnan(abs_eb) else abs_eb,
            payload=payload,
        )


def _or_nan(x: float | None) -> float:
    return math.nan if x is None else float(x)
