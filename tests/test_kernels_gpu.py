"""szp GPU kernels: they compile (nvcc, sm_80 and sm_90), their logic matches the C++ codec under a host
emulation (no GPU needed), and on a CUDA machine they match it for real: identical encoder bytes,
identical decoded tensors, the caller's stream, and no device allocation per decode."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from moeserve.codecs import Blob, decode, decode_into, encode
from moeserve.codecs import gpu

REPO = Path(__file__).resolve().parents[1]
STORED = (torch.float32, torch.float16, torch.bfloat16)


def _has_cupy() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


gpu_only = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_cupy = pytest.mark.skipif(not _has_cupy(), reason="needs cupy (pip install 'moeserve[gpu-cuda13]', or gpu-cuda12 for a CUDA 12 torch)")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_every_kernel_compiles_with_nvcc_for_sm80_and_sm90(tmp_path):
    source = tmp_path / "instances.cu"
    addresses = ", ".join(f"(void*)&{name}" for name in gpu.KERNELS)
    source.write_text(f"{gpu.KERNEL_SOURCE}void* szp_all_kernels[] = {{{addresses}}};\n")
    arches = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in (80, 90)]
    command = ["nvcc", *gpu.compile_options(), "-Werror", "all-warnings", *arches, "-c", str(source), "-o",
               str(tmp_path / "instances.o")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
def test_kernels_match_the_cpp_codec_under_host_emulation(tmp_path):
    exe = tmp_path / "szp_kernel_emulation"
    sources = [REPO / "tests" / "szp_kernel_emulation.cpp", *sorted((REPO / "csrc").glob("szp_*.cpp"))]
    sources = [s for s in sources if s.name != "szp_module.cpp"]  # the Python binding is not needed
    build = subprocess.run(
        ["g++", "-std=c++17", "-O1", "-ffp-contract=off", f"-I{REPO / 'kernels'}", f"-I{REPO / 'csrc'}",
         *map(str, sources), "-o", str(exe)],  # fmt: skip
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "DIFFER" not in run.stdout, run.stdout + run.stderr


def weights(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.02
    x[torch.rand(n, generator=g) < 0.003] *= 30
    return x.to(dtype)


CASES = [(300_001, 1e-3), (8192 * 3, 2e-5), (1000, 1e-9), (31, 0.5)]


@gpu_only
@requires_cuda
@requires_cupy
@pytest.mark.parametrize("dtype", STORED)
@pytest.mark.parametrize("n,eb", CASES)
def test_gpu_encoder_writes_the_cpp_encoders_bytes(dtype, n, eb):
    x = weights(n, dtype)
    assert bytes(encode(x.cuda(), codec="szp", error_bound=eb)) == bytes(encode(x, codec="szp", error_bound=eb))


@gpu_only
@requires_cuda
@requires_cupy
@pytest.mark.parametrize("stored", STORED)
@pytest.mark.parametrize("out", STORED)
@pytest.mark.parametrize("n,eb", CASES)
def test_gpu_decoder_matches_the_cpp_decoder(stored, out, n, eb):
    blob = Blob.from_bytes(bytes(encode(weights(n, stored), codec="szp", error_bound=eb)))
    on_gpu = decode_into(blob, torch.full((n,), float("nan"), dtype=out, device="cuda"))
    assert torch.equal(on_gpu.cpu(), decode_into(blob, torch.empty(n, dtype=out)))


@gpu_only
@requires_cuda
@requires_cupy
def test_decode_runs_on_the_callers_stream_and_from_a_device_payload():
    x = weights(100_000, torch.bfloat16).reshape(100, 1000)
    blob = encode(x, codec="szp", error_bound=1e-3)
    expected = decode(blob).cuda()
    stream = torch.cuda.Stream()
    out = torch.empty(100, 1000, dtype=torch.bfloat16, device="cuda")
    decode_into(blob, out, stream=stream)
    stream.synchronize()
    assert torch.equal(out, expected)
    on_device = blob.with_payload(blob.payload_tensor().cuda())
    assert torch.equal(decode(on_device, device="cuda"), expected)


@gpu_only
@requires_cuda
@requires_cupy
def test_steady_state_decode_allocates_no_device_memory():
    blobs = [encode(weights(50_000 * (i + 1), torch.bfloat16), codec="szp", error_bound=1e-3) for i in range(3)]
    outs = [torch.empty(b.shape, dtype=torch.float32, device="cuda") for b in blobs]
    for blob, out in zip(blobs, outs):  # first calls: module compile, staging buffer growth
        decode_into(blob, out)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(5):
        for blob, out in zip(blobs, outs):
            decode_into(blob, out)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before


@gpu_only
@requires_cuda
@pytest.mark.parametrize("codec", ["sz3", "zfp", "raw", "int8", "int4"])
def test_other_codecs_decode_to_cuda_through_the_cpu(codec):
    x = weights(10_000, torch.float16)
    blob = encode(x, codec=codec, error_bound=1e-3 if codec in ("sz3", "zfp") else None)
    assert torch.equal(decode(blob, device="cuda").cpu(), decode(blob))
