"""Check-and-patch: makes a float32 CPU compressor (SZ3, ZFP) guarantee its bound in the tensor's own dtype.

The inner compressor sees the tensor as float32 (the only float width pysz and zfpy share with torch's
three dtypes). Its float32 output, rounded back to the stored dtype, can miss the bound by up to half an
ulp of that dtype, and the compressors give no hard guarantee at extreme ranges. So the encoder decodes its
own output, and every value that misses |y - x| <= eb (NaN included) is stored verbatim in a patch list.

Payload: inner bytes u64 | inner bytes | patches u64 | indices u64 x k | values x k (stored dtype bits).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

_U64 = np.dtype("<u8")

# compress(float32 array) -> bytes; decompress(bytes, shape) -> float32 array
Compress = Callable[[np.ndarray], bytes]
Decompress = Callable[[bytes, tuple[int, ...]], np.ndarray]


def encode(x: torch.Tensor, eb: float, compress: Compress, decompress: Decompress) -> np.ndarray:
    shape = _inner_shape(tuple(x.shape))
    inner = compress(x.float().numpy().reshape(shape))
    y = torch.from_numpy(decompress(inner, shape)).reshape(-1).to(x.dtype)
    flat = x.reshape(-1)
    miss = ~((y.double() - flat.double()).abs() <= eb)
    idx = miss.nonzero().reshape(-1)
    values = flat[idx].view(torch.int32 if x.dtype == torch.float32 else torch.int16).numpy()
    return np.concatenate([
        _u64_bytes([len(inner)]), np.frombuffer(inner, np.uint8),
        _u64_bytes([len(idx)]), _u64_bytes(idx.numpy()), values.view(np.uint8),
    ])  # fmt: skip


def decode(payload: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...], decompress: Decompress,
           out: torch.Tensor) -> None:  # fmt: skip
    n_inner = int(payload[:8].view(_U64)[0])
    inner = payload[8 : 8 + n_inner].tobytes()
    k_at = 8 + n_inner
    k = int(payload[k_at : k_at + 8].view(_U64)[0])
    idx = torch.from_numpy(payload[k_at + 8 : k_at + 8 + 8 * k].view(_U64).astype(np.int64))
    bits = payload[k_at + 8 + 8 * k :].view(np.int32 if dtype == torch.float32 else np.int16)
    y = torch.from_numpy(decompress(inner, _inner_shape(shape))).reshape(-1).to(dtype)
    y[idx] = torch.from_numpy(bits.copy()).view(dtype)
    out.view(-1).copy_(y)


def _u64_bytes(values) -> np.ndarray:
    return np.asarray(values, dtype=_U64).view(np.uint8)


def _inner_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Rows x last dimension: both compressors predict along rows, and neither takes size-1 or >4-D shapes."""
    dims = [d for d in shape if d > 1]
    if len(dims) <= 1:
        return (max(1, np.prod(shape, dtype=np.int64).item()),)
    return (int(np.prod(dims[:-1])), dims[-1])
