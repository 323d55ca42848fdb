"""szp: moeserve's own error-bounded block codec (format: docs/szp-format.md).

Encode: CPU tensor -> C++/OpenMP encoder (moeserve._szp_cpu, through szp_cpu.py), or CUDA tensor -> GPU
encoder kernels (gpu.py); both write the same bytes. Decode: payload -> caller's CPU tensor through the C++
decoder, or -> caller's CUDA tensor through the GPU decoder on the caller's stream. Background decoding on
native threads: `native_decoder()`. gpu.py is imported lazily and never imports this module.
"""

from __future__ import annotations

import numpy as np
import torch

from moeserve.codecs.base import Codec, NativeDecoder
from moeserve.codecs.blob import DTYPES, Blob
from moeserve.codecs.registry import register
from moeserve.codecs.szp_cpu import NATIVE_DECODER, bits_view, cpu_module, decode_args, grid_step, malformed


class SzpCodec(Codec):
    name = "szp"
    bounded = True
    encodes_on_cuda = True
    decodes_in_stored_dtype = True

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

    def native_decoder(self) -> NativeDecoder:
        return NATIVE_DECODER

    def decode_cuda(self, blob: Blob, out: torch.Tensor, stream: torch.cuda.Stream) -> None:
        from moeserve.codecs import gpu

        gpu.szp_decode_into(blob, out, stream)


register(SzpCodec())
