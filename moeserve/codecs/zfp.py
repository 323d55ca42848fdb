"""zfp: ZFP fixed-accuracy mode through zfpy (tolerance = eb). CPU only, float32 inside; the bound is made a
guarantee in the tensor's own dtype by patch.py."""

from __future__ import annotations

import numpy as np
import torch
import zfpy

from moeserve.codecs import patch
from moeserve.codecs.base import Codec
from moeserve.codecs.blob import Blob
from moeserve.codecs.registry import register


class ZfpCodec(Codec):
    name = "zfp"
    bounded = True
    decodes_in_stored_dtype = True

    def encode(self, x: torch.Tensor, eb: float | None) -> np.ndarray:
        return patch.encode(x, eb, lambda values: zfpy.compress_numpy(values, tolerance=eb), _decompress)

    def decode_cpu(self, blob: Blob, out: torch.Tensor) -> None:
        patch.decode(blob.payload_numpy(), blob.dtype, blob.shape, _decompress, out)


def _decompress(inner: bytes, shape: tuple[int, ...]) -> np.ndarray:
    # The zfp stream records its own shape; `shape` is what patch.py compressed, checked by the reshape there.
    return zfpy.decompress_numpy(inner)


register(ZfpCodec())
