"""Error-bounded codecs for expert weights.

    blob = encode(tensor, codec="szp", mode="abs", error_bound=1e-3)   # fp32/fp16/bf16, any shape
    out = decode(blob, device="cpu")                                    # or "cuda"; same dtype and shape
    decode_into(blob, out, stream=None)                                 # caller-owned tensor, any float dtype
    bytes(blob); Blob.from_bytes(b)

Data flow: encode checks the tensor (dtype, finite), resolves the bound mode to an absolute bound
(bounds.py), and hands a contiguous tensor to the codec (registry.py), which returns a payload; the Blob
(blob.py) wraps it with everything decode needs. decode / decode_into check the destination and hand it to
the codec's CPU or CUDA path. Codecs: szp (ours, C++ and GPU), sz3, zfp (bounded); raw, int8, int4, mxfp4 (not).
"""

from __future__ import annotations

import torch

from moeserve.alignment import aligned_empty
from moeserve.codecs import mxfp4, quant, raw, sz3, szp, szp_cpu, zfp  # noqa: F401  (importing registers them)
from moeserve.codecs.base import Codec, CodecError, NativeDecoder
from moeserve.codecs.blob import DTYPES, Blob
from moeserve.codecs.bounds import resolve
from moeserve.codecs.registry import get, names
from moeserve.devices import resolve_device

__all__ = [
    "Blob",
    "Codec",
    "CodecError",
    "NativeDecoder",
    "check_decode_target",
    "decode",
    "decode_into",
    "encode",
    "names",
    "single_threaded_codecs",
]


def encode(tensor: torch.Tensor, codec: str = "szp", mode: str = "abs", error_bound: float | None = None) -> Blob:
    """Encodes a float tensor. Bounded codecs (szp, sz3, zfp) need error_bound and guarantee
    max |decode(blob) - tensor| <= the resolved bound, measured in the tensor's dtype."""
    impl = get(codec)
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in DTYPES:
        got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise CodecError(f"codecs encode float32, float16 or bfloat16 tensors, got {got}; convert the tensor first.")
    if not impl.bounded and error_bound is not None:
        raise CodecError(f"codec {codec!r} has no error bound; leave error_bound unset or use szp, sz3 or zfp.")
    if impl.bounded and error_bound is None:
        raise CodecError(f"codec {codec!r} needs an error bound; pass error_bound=, e.g. 1e-3.")
    x = tensor.detach()
    x = (x if impl.encodes_on_cuda and x.is_cuda else x.cpu()).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise CodecError("the tensor contains NaN or Inf values, which no codec stores; clean the weights first.")
    eb = resolve(mode, error_bound, x) if impl.bounded else None
    payload = impl.encode(x, eb) if x.numel() else torch.empty(0, dtype=torch.uint8).numpy()
    return Blob(
        codec=codec,
        dtype=x.dtype,
        shape=tuple(x.shape),
        mode=mode if impl.bounded else "none",
        error_bound=float(error_bound) if impl.bounded else None,
        abs_bound=eb,
        payload=payload,
    )


def decode(blob: Blob, device: str | torch.device = "cpu") -> torch.Tensor:
    """A new tensor with the blob's dtype and shape on `device` ("cpu" or a CUDA device), starting
    64-byte aligned like every weight a matmul reads (alignment.py)."""
    out = aligned_empty(blob.shape, blob.dtype, resolve_device(device, CodecError))
    return decode_into(blob, out)


def decode_into(blob: Blob, out: torch.Tensor, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """Writes the blob's values into `out` (contiguous, blob's shape, any of fp32/fp16/bf16, CPU or CUDA).

    The bound holds in `out` when its dtype is the stored dtype or wider (bf16/fp16 -> fp32); a narrower
    dtype adds that dtype's rounding, as any cast would. On CUDA the work is ordered on `stream` (default:
    the current stream) and the call returns without waiting for it; szp decodes there with its own
    kernel and no device allocation after the first call; other codecs decode on the CPU and copy."""
    check_decode_target(blob, out)
    if out.numel() == 0:
        return out
    impl = get(blob.codec)
    if out.is_cuda:
        impl.decode_cuda(blob, out, stream if stream is not None else torch.cuda.current_stream(out.device))
    elif out.device.type == "cpu":
        impl.decode_cpu(blob, out)
    else:
        raise CodecError(f"codecs decode to cpu or cuda tensors, got a tensor on {out.device}; move it first.")
    return out


def check_decode_target(blob: Blob, out: torch.Tensor, cpu_only: bool = False) -> None:
    """Raises CodecError unless `out` can receive `blob`: a contiguous fp32/fp16/bf16 tensor of its shape."""
    if not isinstance(blob, Blob):
        raise CodecError(f"decode takes a Blob, got {type(blob).__name__}; use Blob.from_bytes on stored bytes.")
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != blob.shape or out.dtype not in DTYPES:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise CodecError(f"decode_into needs a float32/float16/bfloat16 tensor of shape {blob.shape}, got {got}.")
    if not out.is_contiguous():
        raise CodecError("decode_into writes contiguous tensors only; pass a contiguous buffer and copy afterwards.")
    if cpu_only and out.device.type != "cpu":
        raise CodecError(f"this decoder writes CPU tensors, got a tensor on {out.device}; use decode_into for CUDA.")


def single_threaded_codecs() -> None:
    """Later CPU encodes and decodes made from the calling thread use that thread alone (no OpenMP
    team): for worker pools whose workers are already the parallelism."""
    szp_cpu.cpu_module().set_openmp_threads(1)
