"""szp on CUDA: kernels/ compiled by cupy (NVRTC) at first use, launched on the caller's torch stream.

Decode: a Blob whose payload is on the device (used in place) or on the host (copied into this stream's
staging buffer), and a caller-owned CUDA tensor -> one kernel launch writes the tensor. Device memory: the
staging buffer of each (device, stream) only grows, so steady-state decoding allocates nothing.
Encode: a CUDA tensor -> three launches (sizes, chunk scan, data) into a zeroed buffer -> host payload,
byte-identical to the C++ encoder's.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import torch

from moeserve.codecs.base import CodecError
from moeserve.codecs.blob import DTYPES, Blob
from moeserve.codecs.szp_cpu import cpu_module, grid_step

_TAGS = ("szp::F32", "szp::F16", "szp::BF16")  # C++ dtype tag per dtype code (blob.DTYPES order)
THREADS = 256  # kChunkThreads in kernels/portability.cuh: one thread per szp block of a chunk
# Worst-case data bytes of one chunk: 256 blocks of 128 bytes (31 planes + spare, or 32 raw fp32) + signs.
_CHUNK_BOUND = 256 * 128 + 256 * 4


def decode_kernel(stored: int, out: int) -> str:
    return f"szp_decode_kernel<{_TAGS[stored]}, {_TAGS[out]}>"


def encode_kernels(stored: int) -> tuple[str, str]:
    return f"szp_encode_sizes_kernel<{_TAGS[stored]}>", f"szp_encode_data_kernel<{_TAGS[stored]}>"


SCAN_KERNEL = "szp_scan_chunks_kernel"
KERNELS = (
    *(decode_kernel(s, o) for s in range(3) for o in range(3)),
    *(name for s in range(3) for name in encode_kernels(s)),
    SCAN_KERNEL,
)


def kernel_dir() -> Path:
    """kernels/ of the source tree (editable install), or its copy in the package (built by setup.py)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[1] / "_kernels", here.parents[2] / "kernels"):
        if (candidate / "szp_format.h").is_file():
            return candidate
    raise CodecError("the szp GPU kernel sources are missing from this install; reinstall moeserve.")


KERNEL_SOURCE = '#include "szp_decode.cu"\n#include "szp_encode.cu"\n'


def compile_options() -> tuple[str, ...]:
    # --fmad=false: the encoder's arithmetic must round like the C++ encoder's (compiled -ffp-contract=off).
    return ("-std=c++17", "--fmad=false", f"-I{kernel_dir()}")


@functools.cache
def _cupy():
    """cupy, built for the CUDA major version torch was built for (their kernels share one context)."""
    wanted = gpu_extra()
    try:
        import cupy
    except ImportError:
        raise CodecError(f"szp on CUDA needs cupy; install it with `pip install 'moeserve[{wanted}]'`.") from None
    cupy_major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    if torch.version.cuda is not None and f"gpu-cuda{cupy_major}" != wanted:
        raise CodecError(
            f"cupy is built for CUDA {cupy_major} but torch for CUDA {torch.version.cuda}; "
            f"replace it with `pip install 'moeserve[{wanted}]'` (uninstall the other cupy-cuda* first)."
        )
    return cupy


def gpu_extra() -> str:
    """The optional extra whose cupy matches this torch: gpu-cuda12 or gpu-cuda13."""
    major = (torch.version.cuda or "13").split(".")[0]
    return f"gpu-cuda{major}"


@functools.cache
def _module(device_index: int):
    """All szp kernels for one device, compiled by NVRTC on first use (cupy caches the binary on disk)."""
    return _cupy().RawModule(code=KERNEL_SOURCE, options=compile_options(), name_expressions=KERNELS)


@functools.cache
def _kernel(device_index: int, name: str):
    with _cupy().cuda.Device(device_index):
        return _module(device_index).get_function(name)


@functools.cache
def _cupy_stream(handle: int, device_index: int):
    """cupy's view of a torch stream (a handle wrapper, cached so launches create nothing)."""
    cupy = _cupy()
    with warnings.catch_warnings():  # cupy 14 prefers Stream.from_external, which cupy 13 lacks
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(handle, device_index)


def _launch(device: torch.device, name: str, grid: int, args: tuple, stream: torch.cuda.Stream) -> None:
    """One checked launch: cupy raises on a launch error; the kernel is ordered on `stream`."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _cupy().cuda.Device(index):
        _kernel(index, name)((grid,), (THREADS,), args, stream=_cupy_stream(stream.cuda_stream, index))


def _ptr(t: torch.Tensor, offset: int = 0) -> np.uint64:
    return np.uint64(t.data_ptr() + offset)


# (device index, stream handle) -> staging buffer for host payloads. Grows, never shrinks.
_staging: dict[tuple[int, int], torch.Tensor] = {}


def _stage(payload: torch.Tensor, device: torch.device, stream: torch.cuda.Stream) -> torch.Tensor:
    key = (device.index, stream.cuda_stream)
    buf = _staging.get(key)
    n = payload.numel()
    if buf is None or buf.numel() < n:
        with torch.cuda.stream(stream):  # allocated on this stream, so stream-ordered reuse is safe
            buf = torch.empty(max(n, 2 * (0 if buf is None else buf.numel())), dtype=torch.uint8, device=device)
        _staging[key] = buf
    dst = buf[:n]
    with torch.cuda.stream(stream):
        dst.copy_(payload, non_blocking=True)  # asynchronous when the host payload is pinned
    return dst


def szp_decode_into(blob: Blob, out: torch.Tensor, stream: torch.cuda.Stream) -> None:
    step = grid_step(blob.abs_bound)
    payload = blob.payload
    if isinstance(payload, torch.Tensor) and payload.is_cuda:
        if payload.device != out.device:
            raise CodecError(f"the blob's payload is on {payload.device} but the output on {out.device}; move one.")
        if payload.data_ptr() % 8:  # the kernel reads the chunk table as 64-bit words
            raise CodecError("a device payload must start 8-byte aligned; place it at an aligned offset.")
        device_payload = payload
    else:
        n, header_step, stored, _ = cpu_module().read_header(blob.payload_numpy())
        if n != blob.numel or header_step != step or DTYPES[stored] != blob.dtype:
            raise CodecError("this szp blob's payload does not match its header fields; re-encode the tensor.")
        device_payload = _stage(blob.payload_tensor(), out.device, stream)
    chunks = cpu_module().layout(blob.numel)["chunks"]
    kernel = decode_kernel(DTYPES.index(blob.dtype), DTYPES.index(out.dtype))
    args = (_ptr(device_payload), np.uint64(blob.numel), np.float32(step), _ptr(out))
    _launch(out.device, kernel, chunks, args, stream)


def szp_encode(x: torch.Tensor, step: float, eb: float) -> np.ndarray:
    """Encodes a contiguous CUDA tensor on the current stream; returns the host payload."""
    cpu = cpu_module()
    n, code, stream = x.numel(), DTYPES.index(x.dtype), torch.cuda.current_stream(x.device)
    lay = cpu.layout(n)
    chunks, table, rates, data = lay["chunks"], lay["table_off"], lay["rates_off"], lay["data_off"]
    buf = torch.zeros(data + chunks * _CHUNK_BOUND, dtype=torch.uint8, device=x.device)
    sizes_kernel, data_kernel = encode_kernels(code)
    common = (_ptr(x), np.uint64(n), np.float32(step), np.float64(eb))
    _launch(x.device, sizes_kernel, chunks, (*common, _ptr(buf, rates), _ptr(buf, table + 8)), stream)
    _launch(x.device, SCAN_KERNEL, 1, (_ptr(buf, table + 8), np.uint64(chunks)), stream)
    data_bytes = int(buf[table + 8 * chunks : table + 8 * chunks + 8].view(torch.int64).item())  # waits
    _launch(x.device, data_kernel, chunks, (*common, _ptr(buf, rates), _ptr(buf, table), _ptr(buf, data)), stream)
    payload = buf[: data + data_bytes].cpu().numpy()
    header = np.frombuffer(cpu.write_header(n, step, code, data_bytes), np.uint8)
    payload[: len(header)] = header
    return payload
