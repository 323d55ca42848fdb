"""sz3: SZ3 through pysz (ABS mode), the compression-ratio reference. CPU only, float32 inside; the bound is
made a guarantee in the tensor's own dtype by patch.py."""

from __future__ import annotations

import numpy as np
import torch
from pysz import sz, szConfig, szErrorBoundMode

from moeserve.codecs import patch
from moeserve.codecs.base import Codec
from moeserve.codecs.blob import Blob
from moeserve.codecs.registry import register


class Sz3Codec(Codec):
    name = "sz3"
    bounded = True
    decodes_in_stored_dtype = True

    def encode(self, x: torch.Tensor, eb: float | None) -> np.ndarray:
        def compress(values: np.ndarray) -> bytes:
            config = szConfig()
            config.errorBoundMode = szErrorBoundMode.ABS
            config.absErrorBound = eb
            return sz.compress(values, config)[0].tobytes()

        return patch.encode(x, eb, compress, _decompress)

    def decode_cpu(self, blob: Blob, out: torch.Tensor) -> None:
        patch.decode(blob.payload_numpy(), blob.dtype, blob.shape, _decompress, out)


def _decompress(inner: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return sz.decompress(np.frombuffer(inner, np.uint8), np.float32, shape)[0]


register(Sz3Codec())
