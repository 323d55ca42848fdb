"""szp: moeserve's own error-bounded block codec (format: docs/szp-format.md).

Encode: CPU tensor -> C++/OpenMP encoder (moeserve._szp_cpu), or CUDA tensor -> GPU encoder kernels
(gpu.py); both write the same bytes. Decode: payload -> caller's CPU tensor through the C++ decoder, or ->
caller's CUDA tensor through the GPU decoder on the caller's stream. Values are passed as raw bit patterns
(int32/int16 views), so bf16 never needs a numpy dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from moeserve.codecs.base import Codec, CodecError
from moeserve.codecs.blob import DTYPES, Blob
from moeserve.codecs.registry import register

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


def decode_args(blob: Blob, out: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """(payload, out, out dtype code): what the C++ decoder and its DecodePool take for one tensor."""
    return blob.payload_numpy(), bits_view(out).numpy(), DTYPES.index(out.dtype)


def malformed(error: ValueError) -> CodecError:
    return CodecError(f"this szp blob is malformed ({error}); re-encode the tensor.")


class SzpCodec(Codec):
    name = "szp"
    bounded = True
    encodes_on_cuda = True

    def encode(self, x: torch.Tensor, eb: float | None) -> np.ndarray:
        if x.is_cuda:
            from moeserve.codecs import gpu

            return gpu.szp_encode(x, grid_step(eb), eb)
        return cpu_module().encode(bits_view(x).numpy(), DTYPES.index(x.dtype), grid_step(eb), eb)

    def decode_cpu(self, blob: Blob, out: torch.Tensor) -> None:
        try:
            cpu_module().decode_into(*decode_args(blob, out))
        except ValueError as e:  # a malformed payload that passed the checksum (hand-made bytes)
            raise malformed(e) from None

    def decode_cuda(self, blob: Blob, out: torch.Tensor, stream: torch.cuda.Stream) -> None:
        from moeserve.codecs import gpu

        gpu.szp_decode_into(blob, out, stream)


register(SzpCodec())
