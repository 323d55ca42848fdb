"""mxfp4: the OCP Microscaling FP4 format gpt-oss checkpoints ship their experts in (4.25 bits/value).

Format (OCP MX spec v1.0, as gpt-oss and transformers store it): blocks of 32 consecutive values
(row-major, so along the last dimension; the last block is zero-padded) share one UE8M0 scale
byte s, the power of two 2^(s - 127); each value is an FP4 E2M1 code (sign, 2 exponent bits,
1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives), two codes per byte, the even
element in the low nibble.

Payload: scales u8 x blocks | codes u8 x (16 per block).

Decoding is transformers' `convert_moe_packed_tensors` op for op (FP4 lookup table in the output
dtype, then `ldexp` by the scale), on the CPU or, for a payload already on a CUDA device, there, so
an MXFP4 checkpoint's experts decode to exactly the weights transformers computes with. Encoding
(for a float tensor under `codec: mxfp4`) picks the spec's scale 2^(floor(log2(max |x|)) - 2) per
block and rounds to the nearest FP4 value, ties to even, saturating at 6. Unbounded: no error
bound is claimed. An MXFP4 checkpoint's blocks and scales are wrapped as they are (`blob_of`),
never re-encoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moeserve.alignment import aligned_empty
from moeserve.codecs.base import Codec
from moeserve.codecs.blob import Blob
from moeserve.codecs.registry import register

BLOCK = 32
SCALE_BIAS = 127
# The E2M1 values of codes 0..15 (code 8 is -0.0), transformers' FP4_VALUES.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Midpoints between neighbouring magnitudes; a tie goes to the even code (0.25 → 0, 0.75 → 1.0, ...).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIES_UP = (0.75, 1.75, 3.5)  # the midpoints whose upper neighbour has the even code
_ELEMENT_EMAX = 2  # the largest E2M1 exponent: 6 = 1.5 * 2^2


@dataclass(frozen=True)
class Mxfp4Tensor:
    """A tensor as an MXFP4 checkpoint stores it (views into the mapped file)."""

    blocks: torch.Tensor  # uint8 [..., G, 16]: 32 codes per block, two per byte
    scales: torch.Tensor  # uint8 [..., G]: one UE8M0 exponent per block
    dtype: torch.dtype  # the float dtype the values are used in

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.scales.shape[:-1], self.scales.shape[-1] * BLOCK)

    def dequantize(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The values [..., G * 32] in `dtype` on `device`, decoded there."""
        scales = self.scales.to(device).reshape(-1)
        out = aligned_empty((scales.numel(), BLOCK), self.dtype, scales.device)  # a matmul may read it
        _dequantize(scales, self.blocks.to(device).reshape(-1, BLOCK // 2), out)
        return out.view(self.shape)


def blob_of(tensor: Mxfp4Tensor) -> Blob:
    """The tensor's blocks and scales as an mxfp4 blob, bytes unchanged."""
    payload = torch.cat((tensor.scales.reshape(-1), tensor.blocks.reshape(-1))).numpy()
    return Blob(codec="mxfp4", dtype=tensor.dtype, shape=tensor.shape, mode="none", error_bound=None,
                abs_bound=None, payload=payload)  # fmt: skip


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float values [N * 32] → scales uint8 [N] and blocks uint8 [N, 16]."""
    groups = x.float().reshape(-1, BLOCK)  # [N, 32]
    amax = groups.abs().amax(dim=1)  # [N]
    exponent = torch.floor(torch.log2(amax)) - _ELEMENT_EMAX  # -inf for an all-zero block
    exponent = exponent.clamp(-SCALE_BIAS, SCALE_BIAS)
    scaled = groups / torch.exp2(exponent)[:, None]  # exact: a power of two
    magnitude = scaled.abs()
    midpoints = torch.tensor(_MIDPOINTS)
    code = torch.bucketize(magnitude, midpoints)  # a value on a midpoint goes down ...
    code += torch.isin(magnitude, torch.tensor(_TIES_UP)).to(code.dtype)  # ... unless the even code is up
    code |= (scaled < 0).to(code.dtype) << 3
    pairs = code.to(torch.uint8).view(-1, BLOCK // 2, 2)  # [N, 16, 2]
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return (exponent + SCALE_BIAS).to(torch.uint8), blocks


_LUTS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FP4_VALUES [16] in `dtype` on `device`, made once (a fresh copy to a GPU would stall the host)."""
    key = (device, dtype)
    if key not in _LUTS:
        lut = torch.tensor(FP4_VALUES, dtype=dtype).to(device)
        if lut.is_cuda:  # complete before any other stream reads it
            torch.cuda.current_stream(device).synchronize()
        _LUTS[key] = lut
    return _LUTS[key]


def _dequantize(scales: torch.Tensor, blocks: torch.Tensor, out: torch.Tensor) -> None:
    """scales [N] and blocks [N, 16] (uint8, on out's device) → out [N, 32], as transformers does it."""
    lut = _lut(out.device, out.dtype)
    out[:, 0::2] = lut[(blocks & 0x0F).to(torch.int)]
    out[:, 1::2] = lut[(blocks >> 4).to(torch.int)]
    torch.ldexp(out, scales.to(torch.int32)[:, None] - SCALE_BIAS, out=out)


class Mxfp4Codec(Codec):
    name = "mxfp4"
    bounded = False

    def encode(self, x: torch.Tensor, eb: float | None) -> np.ndarray:
        flat = torch.nn.functional.pad(x.reshape(-1).float(), (0, -x.numel() % BLOCK))
        scales, blocks = quantize(flat)
        return torch.cat((scales, blocks.reshape(-1))).numpy()

    def decode_cpu(self, blob: Blob, out: torch.Tensor) -> None:
        self._decode(blob.payload_tensor(), blob.numel, out)

    def decode_cuda(self, blob: Blob, out: torch.Tensor, stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            payload = blob.payload
            if not (isinstance(payload, torch.Tensor) and payload.device == out.device):
                payload = blob.payload_tensor().to(out.device, non_blocking=True)
            self._decode(payload, blob.numel, out)

    @staticmethod
    def _decode(payload: torch.Tensor, numel: int, out: torch.Tensor) -> None:
        n = -(-numel // BLOCK)
        scales, blocks = payload[:n], payload[n : n + n * BLOCK // 2].view(n, BLOCK // 2)
        if numel % BLOCK == 0:
            _dequantize(scales, blocks, out.view(n, BLOCK))  # straight into place
        else:
            padded = torch.empty(n, BLOCK, dtype=out.dtype, device=out.device)
            _dequantize(scales, blocks, padded)
            out.view(-1).copy_(padded.view(-1)[:numel])


register(Mxfp4Codec())
