"""int8 / int4: group-wise round-to-nearest quantization, the baselines szp is compared against.

Groups of GROUP consecutive values (row-major, so along the last dimension); per group one float32 scale =
max |x| / qmax, q = round(x / scale) in [-qmax, qmax]. No error bound is claimed: the error is up to half a
step, which depends on each group's largest value. int4 packs two values per byte (low nibble first).

Payload: scales float32 x groups | codes (int8 per value, or one byte per two int4 values).
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch

from moeserve.codecs.base import Codec
from moeserve.codecs.blob import Blob
from moeserve.codecs.registry import register

GROUP = 128


class _GroupQuant(Codec):
    bounded = False
    bits: int
    decodes_in_stored_dtype = True

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def encode(self, x: torch.Tensor, eb: float | None) -> np.ndarray:
        groups = _groups(x.reshape(-1).float())  # [G, GROUP]
        scale = groups.abs().amax(dim=1) / self.qmax  # [G]
        scale[scale == 0] = 1.0  # an all-zero group: any scale reproduces it
        q = torch.round(groups / scale[:, None]).clamp_(-self.qmax, self.qmax).to(torch.int8)
        return np.concatenate([scale.numpy().view(np.uint8), self._pack(q.reshape(-1)).view(np.uint8)])

    def decode_cpu(self, blob: Blob, out: torch.Tensor) -> None:
        n = blob.numel
        n_groups = -(-n // GROUP)
        payload = blob.payload_tensor()
        scale = payload[: 4 * n_groups].view(torch.float32)
        q = self._unpack(payload[4 * n_groups :]).view(n_groups, GROUP)
        values = (q.float() * scale[:, None]).reshape(-1)[:n]
        out.view(-1).copy_(values.to(blob.dtype))  # round like the stored dtype would, then to out's dtype

    @abstractmethod
    def _pack(self, q: torch.Tensor) -> np.ndarray:
        """int8 codes in [-qmax, qmax] -> payload bytes."""

    @abstractmethod
    def _unpack(self, codes: torch.Tensor) -> torch.Tensor:
        """payload bytes -> int8 codes."""


class Int8Codec(_GroupQuant):
    name = "int8"
    bits = 8

    def _pack(self, q: torch.Tensor) -> np.ndarray:
        return q.numpy()

    def _unpack(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.view(torch.int8)


class Int4Codec(_GroupQuant):
    name = "int4"
    bits = 4

    def _pack(self, q: torch.Tensor) -> np.ndarray:
        nibbles = (q + 8).to(torch.uint8).view(-1, 2)  # GROUP is even, so pairs never straddle the end
        return (nibbles[:, 0] | (nibbles[:, 1] << 4)).numpy()

    def _unpack(self, codes: torch.Tensor) -> torch.Tensor:
        pairs = torch.stack([codes & 0xF, codes >> 4], dim=1).reshape(-1)
        return pairs.to(torch.int8) - 8


def _groups(flat: torch.Tensor) -> torch.Tensor:
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % GROUP))
    return padded.view(-1, GROUP)


register(Int8Codec())
register(Int4Codec())
