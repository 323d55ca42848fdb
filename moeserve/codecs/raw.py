"""raw: lossless passthrough, the tensor's own bytes. The reference point for bits/value (16 or 32)."""

from __future__ import annotations

import numpy as np
import torch

from moeserve.codecs.base import Codec
from moeserve.codecs.blob import Blob
from moeserve.codecs.registry import register


class RawCodec(Codec):
    name = "raw"
    bounded = False
    decodes_in_stored_dtype = True

    def encode(self, x: torch.Tensor, eb: float | None) -> np.ndarray:
        return x.reshape(-1).view(torch.uint8).numpy().copy()

    def decode_cpu(self, blob: Blob, out: torch.Tensor) -> None:
        values = blob.payload_tensor().view(blob.dtype).view(blob.shape)
        out.copy_(values)


register(RawCodec())
