"""Build steps pyproject.toml cannot express: the szp CPU codec (C++/OpenMP extension moeserve._szp_cpu), the
CPU grouped GEMM and paged decode attention (moeserve._cpu_gemm, the same flags: built without -march, it picks AVX-512F, AVX2+FMA or
scalar code at run time with per-function target attributes) and shipping the GPU kernel sources (kernels/,
compiled at run time by cupy) inside the package as moeserve/_kernels.

Metadata and dependencies live in pyproject.toml.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

# -ffp-contract=off: the encoder's arithmetic must round exactly like the GPU kernels' (__fmul_rn, no FMA),
# or the two encoders would not write identical bytes on an FMA-capable -march; the GEMM's scalar path must
# round exactly like its vector paths (every fused multiply-add explicit, no other contracted).
CXX_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fvisibility=hidden"]


class BuildExt(build_ext):
    """Adds OpenMP when the system compiler supports it; without it the codec builds single-threaded."""

    def build_extensions(self):
        openmp = ["-fopenmp"] if self._compiles(["-fopenmp"]) else []
        if not openmp:
            print("moeserve: the C++ compiler has no OpenMP; the szp CPU codec and the CPU GEMM will run on one thread",
                  file=sys.stderr)
        for ext in self.extensions:
            ext.extra_compile_args = CXX_FLAGS + openmp
            ext.extra_link_args = openmp
        super().build_extensions()

    def _compiles(self, flags):
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "omp_check.cpp"
            src.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
            try:
                objs = self.compiler.compile([str(src)], output_dir=tmp, extra_postargs=flags)
                self.compiler.link_executable(objs, str(Path(tmp) / "omp_check"), extra_postargs=flags)
            except Exception:  # any compiler or linker failure means: no usable OpenMP
                return False
        return True


class BuildPy(build_py):
    """Copies kernels/ (the GPU kernels) and the sources of the C++ torch ops moeserve builds on first use
    (moeserve/native_ops.py) into the built package, so an installed (non-editable) moeserve finds them."""

    def run(self):
        super().run()
        dst = Path(self.build_lib) / "moeserve" / "_kernels"
        dst.mkdir(parents=True, exist_ok=True)
        for src in Path("kernels").glob("*"):
            if src.suffix in (".cu", ".cuh", ".h"):
                shutil.copy2(src, dst / src.name)
        dst = Path(self.build_lib) / "moeserve" / "_csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("torch_ops.cpp", "cpu_gemm.h", "cpu_attention.h"):
            shutil.copy2(Path("csrc") / name, dst / name)


setup(
    ext_modules=[
        Extension(
            "moeserve._szp_cpu",
            sources=["csrc/szp_module.cpp", "csrc/szp_header.cpp", "csrc/szp_encode.cpp", "csrc/szp_decode.cpp",
                     "csrc/szp_decode_avx2.cpp", "csrc/szp_decode_avx2_bmi2.cpp", "csrc/szp_decode_avx512.cpp",
                     "csrc/szp_decode_avx512_gfni.cpp", "csrc/szp_decode_avx512_gfni_bf16.cpp", "csrc/szp_decode_pool.cpp",
                     "csrc/slot_cache.cpp", "csrc/decode_team.cpp"],
            include_dirs=["csrc", "kernels", pybind11.get_include()],
            depends=["csrc/szp_codec.h", "csrc/szp_simd.h", "csrc/szp_decode_chunk.h", "csrc/szp_decode_pool.h", "csrc/slot_cache.h", "csrc/decode_team.h", "csrc/szp_plane_bytes.h", "csrc/szp_decode_avx2_block.h", "csrc/szp_decode_avx512_block.h", "kernels/szp_format.h"],  # rebuild when they change
            language="c++",
        ),
        Extension(
            "moeserve._cpu_gemm",
            sources=["csrc/cpu_gemm_module.cpp", "csrc/cpu_gemm.cpp", "csrc/cpu_attention.cpp"],
            include_dirs=["csrc", pybind11.get_include()],
            depends=["csrc/cpu_gemm.h", "csrc/cpu_attention.h", "csrc/cpu_numbers.h"],
            language="c++",
        ),
    ],
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
)
