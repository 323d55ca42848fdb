"""The CPU grouped GEMM kernel (C++ extension moeserve._cpu_gemm, csrc/cpu_gemm.cpp) as a torch op.

In:  a [R, Kdim] (any row stride; copied first if its features are not contiguous), rows [P] and slots [P]
     long, weights [S, N, Kdim] whose every slot's [N, Kdim] matrix is contiguous (any slot stride: the
     strided views of experts.expert_rows), all on the CPU, a and weights both float32 or both bfloat16.
Out: [P, N] in a's dtype, out[p] = a[rows[p]] @ weights[slots[p]].T, accumulated in float32.

One summation order, everywhere (csrc/cpu_gemm.h): every output sums over k in 16 float32 lanes (lane = k
mod 16, fused multiply-adds in increasing k), then a fixed tree over the lanes (+8, +4, +2, +1), then one
rounding to bfloat16 (nearest even) where the dtype is. The AVX-512F, AVX2+FMA and scalar paths follow it
and write the same bytes, so a result depends on neither the machine's vector width, nor on the pairs and
slots that share the call, nor on the thread count. It is not F.linear's order: the two agree to float32
rounding, not bit for bit.

The op is registered as moeserve::cpu_grouped_gemm (with a fake for shapes), so torch.compile(fullgraph=True)
keeps it as one extern call. `available(dtype)` says whether it can run (the extension is built and the
dtype supported: float16 is not, and callers keep torch there).

The path: the widest the CPU supports, or what MOESERVE_CPU_ISA (read when the extension is imported) or
`set_isa` names: "scalar", "avx2", "avx512" or "auto", for tests and benchmarks (all give the same bits).
"""

from __future__ import annotations

import torch

try:
    from moeserve import _cpu_gemm as _ext
except ModuleNotFoundError:  # not built (a broken build or a bad MOESERVE_CPU_ISA still raises)
    _ext = None

# dtype → the extension's code for (a, weights, out)
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def available(dtype: torch.dtype) -> bool:
    """Whether cpu_grouped_gemm runs for tensors of `dtype`: the extension is built and takes the dtype."""
    return _ext is not None and dtype in _DTYPE_CODES


def isa() -> str | None:
    """The path calls take now ("scalar", "avx2" or "avx512"); None when the extension is not built."""
    return None if _ext is None else _ext.isa()


def supported_isas() -> list[str]:
    """The paths this CPU can run (none when the extension is not built)."""
    return [] if _ext is None else list(_ext.supported_isas())


def set_isa(name: str) -> None:
    """Run later calls on `name` ("scalar", "avx2", "avx512", or "auto": the widest the CPU supports).
    A ValueError for another name or one this CPU cannot run."""
    if _ext is None:
        raise ValueError("the CPU GEMM extension is not built; run `pip install -e .` in the moeserve checkout.")
    _ext.set_isa(name)


def cpu_grouped_gemm(a: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[p] = a[rows[p]] @ weights[slots[p]].T: a [R, Kdim], rows [P], slots [P], weights [S, N, Kdim] →
    [P, N] in a's dtype. A ValueError names what does not fit (an index out of range included)."""
    check_arguments(a, rows, slots, weights)
    return torch.ops.moeserve.cpu_grouped_gemm(a, rows, slots, weights)


def check_arguments(a: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> None:
    if not available(a.dtype):
        why = "the extension is not built" if _ext is None else f"it takes float32 and bfloat16, not {a.dtype}"
        raise ValueError(f"cpu_grouped_gemm cannot run: {why}.")
    if a.dim() != 2 or weights.dim() != 3:
        raise ValueError(
            f"cpu_grouped_gemm needs a [R, Kdim] and weights [S, N, Kdim], got {tuple(a.shape)} and {tuple(weights.shape)}."
        )
    if a.shape[1] != weights.shape[2]:
        raise ValueError(f"cpu_grouped_gemm: a has {a.shape[1]} features but weights take {weights.shape[2]}.")
    if weights.dtype != a.dtype:
        raise ValueError(f"cpu_grouped_gemm needs a and weights in one dtype, got {a.dtype} and {weights.dtype}.")
    for name, ids in (("rows", rows), ("slots", slots)):
        if ids.dim() != 1 or ids.dtype != torch.long:
            raise ValueError(
                f"cpu_grouped_gemm needs {name} as a 1-D long tensor, got {ids.dtype} of shape {tuple(ids.shape)}."
            )
    if rows.shape != slots.shape:
        raise ValueError(
            f"cpu_grouped_gemm needs one row and one slot per pair, got {rows.shape[0]} rows and {slots.shape[0]} slots."
        )
    devices = {t.device.type for t in (a, rows, slots, weights)}
    if devices != {"cpu"}:
        raise ValueError(f"cpu_grouped_gemm needs every tensor on the CPU, got {sorted(devices)}.")
    if not _slots_contiguous(weights):
        raise ValueError(
            f"cpu_grouped_gemm needs each slot's [N, Kdim] matrix contiguous, got strides {weights.stride()}."
        )


def _slots_contiguous(weights: torch.Tensor) -> bool:
    """Whether each weights[s] is a contiguous [N, Kdim] matrix (strides of dims of size 1 do not matter)."""
    _, n_out, k_dim = weights.shape
    return (k_dim <= 1 or weights.stride(2) == 1) and (n_out <= 1 or weights.stride(1) == k_dim)


@torch.library.custom_op("moeserve::cpu_grouped_gemm", mutates_args=(), device_types="cpu")
def _cpu_grouped_gemm_op(a: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The op cpu_grouped_gemm calls after its checks; it repeats the cheap layout ones, since a compiled graph
    may hand it tensors laid out otherwise than the traced ones."""
    num_slots, n_out, k_dim = weights.shape
    if not _slots_contiguous(weights):
        raise ValueError(f"cpu_grouped_gemm needs each slot's [N, Kdim] matrix contiguous, got strides {weights.stride()}.")
    if k_dim > 1 and a.stride(1) != 1:
        a = a.contiguous()
    rows, slots = rows.contiguous(), slots.contiguous()
    out = torch.empty(rows.shape[0], n_out, dtype=a.dtype)
    _ext.grouped_gemm(
        _DTYPE_CODES[a.dtype], a.data_ptr(), a.shape[0], a.stride(0), weights.data_ptr(), num_slots, weights.stride(0),
        n_out, k_dim, rows.data_ptr(), slots.data_ptr(), rows.shape[0], out.data_ptr(), torch.get_num_threads(),
    )
    return out


@_cpu_grouped_gemm_op.register_fake
def _(a: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return a.new_empty(rows.shape[0], weights.shape[1])
