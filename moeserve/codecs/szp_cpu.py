"""The szp C++ extension (moeserve._szp_cpu) and the arguments it takes, shared by the CPU codec, the
GPU codec (header and layout helpers) and the native background decoder.

In:  torch tensors and Blobs.
Out: the extension module, its call arguments (raw bit-pattern views, dtype codes, the grid step), and
     its ValueError for a malformed payload as a CodecError.

Values are passed as raw bit patterns (int32/int16 views), so bf16 never needs a numpy dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from moeserve.codecs.base import CodecError, NativeDecoder
from moeserve.codecs.blob import DTYPES, Blob

_FLT_MIN = float(np.finfo(np.float32).tiny)
_FLT_MAX = float(np.finfo(np.float32).max)


def grid_step(eb: float) -> float:
    """The grid step: the largest float32 <= 2 eb, kept within the normal float32 range.

    Any step is correct (the encoder checks every value); this one makes the grid as coarse as the bound
    allows. eb = 0 or an eb below float32's range gives FLT_MIN: every nonzero block is then stored raw."""
    step = np.float32(min(2 * eb, _FLT_MAX))
    if float(step) > 2 * eb:
        step = np.nextafter(step, np.float32(0))
    return max(float(step), _FLT_MIN)


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """The same memory as int32 (fp32) or int16 (fp16/bf16): the codec reads and writes bit patterns."""
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def cpu_module():
    try:
        from moeserve import _szp_cpu
    except ImportError as e:
        raise CodecError("the szp C++ extension is not built; run `pip install -e .` in the moeserve checkout.") from e
    return _szp_cpu


def held_slots_address() -> int | None:
    """The address of the C++ expert cache's entry point (csrc/slot_cache.h held_slots_entry) for the C++ op of
    compiled steps (native_ops.load), or None where the extension is not built."""
    try:
        from moeserve import _szp_cpu
    except ImportError:
        return None
    return _szp_cpu.held_slots_address()


def decode_target(out: torch.Tensor) -> tuple[np.ndarray, int]:
    """(out's bits, its dtype code): what the C++ decoder takes for the tensor it writes."""
    return bits_view(out).numpy(), DTYPES.index(out.dtype)


def decode_args(blob: Blob, out: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """(payload, out, out dtype code): what the C++ decoder and its DecodePool take for one tensor."""
    return (blob.payload_numpy(), *decode_target(out))


def malformed(error: ValueError) -> CodecError:
    return CodecError(f"this szp blob is malformed ({error}); re-encode the tensor.")


class SzpNativeDecoder(NativeDecoder):
    """The extension's DecodePool: C++ threads that decode szp blobs without taking the GIL."""

    name = "szp"

    def start_pool(self, threads: int, spare_cores: bool = True):
        return cpu_module().DecodePool(threads, spare_cores)

    def source(self, blob: Blob) -> np.ndarray:
        return blob.payload_numpy()

    def target(self, out: torch.Tensor) -> tuple[np.ndarray, int]:
        return decode_target(out)

    def job(self, source: np.ndarray, target: tuple[np.ndarray, int]) -> tuple[np.ndarray, np.ndarray, int]:
        return (source, *target)

    def error(self, error: ValueError) -> CodecError:
        return malformed(error)


NATIVE_DECODER = SzpNativeDecoder()
