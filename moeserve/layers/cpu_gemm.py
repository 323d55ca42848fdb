"""The CPU grouped GEMM kernel (C++ extension moeserve._cpu_gemm, csrc/cpu_gemm.cpp) as a torch op.

In:  a [R, Kdim] (any row stride; copied first if its features are not contiguous), rows [P] and slots [P]
     long, weights [S, N, Kdim] whose every slot's [N, Kdim] matrix is contiguous (any slot stride: the
     strided views of experts.expert_rows), all on the CPU, a and weights both float32 or both bfloat16, or
     float32 a over bfloat16 weights (an expert cache slot that holds bfloat16-exact weights in half the bytes:
     the kernel widens them exactly, so the result is that of the same weights held in float32, bit for bit).
Out: [P, N] in a's dtype, out[p] = a[rows[p]] @ weights[slots[p]].T, accumulated in float32.

One summation order, everywhere (csrc/cpu_gemm.h): every output sums over k in 16 float32 lanes (lane = k
mod 16, fused multiply-adds in increasing k), then a fixed tree over the lanes (+8, +4, +2, +1), then one
rounding to bfloat16 (nearest even) where the dtype is. The AVX-512F, AVX2+FMA and scalar paths follow it
and write the same bytes, so a result depends on neither the machine's vector width, nor on the pairs and
slots that share the call, nor on the thread count. It is not F.linear's order: the two agree to float32
rounding, not bit for bit.

`cpu_linear(x, weight)` is the one-slot case (a dense layer: rows 0..M-1, slot 0) without index tensors; it
gives the bits cpu_grouped_gemm gives for the same rows.

Under torch.compile both run as the ops moeserve::cpu_grouped_gemm and moeserve::cpu_linear (each with a fake
for shapes), or their C++ twins in moeserve_native once native_ops.load() has built them (a compiled step then
calls the kernel without going back into Python), so torch.compile(fullgraph=True) keeps each as one extern
call; eager calls skip the op dispatch
(about 15 us, more than a small product's arithmetic) and call the extension directly. `available(dtype)`
says whether they can run: the extension is built and the dtype supported (float16 is not: callers keep
torch there).

Inference only: the result records no gradient (layers.linear.Linear keeps F.linear where autograd is on).

The path: the widest the CPU supports, or what MOESERVE_CPU_ISA (read when the extension is imported) or
`set_isa` names: "scalar", "avx2", "avx512" or "auto", for tests and benchmarks (all give the same bits).
"""

from __future__ import annotations

import torch

from moeserve import native_ops

try:
    from moeserve import _cpu_gemm as _ext
except ModuleNotFoundError:  # not built (a broken build or a bad MOESERVE_CPU_ISA still raises)
    _ext = None

# dtype → the extension's code for a and out, and for the weights
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


def entry_address() -> int | None:
    """The address of the extension's C entry point (for moeserve.native_ops' C++ ops); None when not built."""
    return None if _ext is None else _ext.entry_address()


def set_isa(name: str) -> None:
    """Run later calls on `name` ("scalar", "avx2", "avx512", or "auto": the widest the CPU supports).
    A ValueError for another name or one this CPU cannot run."""
    if _ext is None:
        raise ValueError("the CPU GEMM extension is not built; run `pip install -e .` in the moeserve checkout.")
    _ext.set_isa(name)


def cpu_grouped_gemm(a: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[p] = a[rows[p]] @ weights[slots[p]].T: a [R, Kdim], rows [P], slots [P], weights [S, N, Kdim] →
    [P, N] in a's dtype. A ValueError names what does not fit (an index out of range included)."""
    if not _fits(a, rows, slots, weights):
        _explain_misfit(a, rows, slots, weights)
    if torch.compiler.is_compiling():
        return native_ops.ops().cpu_grouped_gemm(a, rows, slots, weights)
    return _grouped(a, rows, slots, weights)  # eager: the op's dispatch would cost more than a small call's math


def cpu_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, Kdim] @ weight [N, Kdim].T → [M, N]: cpu_grouped_gemm with one slot and rows 0..M-1 (the same bits),
    without the index tensors."""
    if not (_fits_dtype(x, weight) and x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1]
            and x.is_cpu and weight.is_cpu and contiguous_matrix(weight)):
        if weight.dim() != 2:
            raise ValueError(f"cpu_linear needs weight as [N, Kdim], got {tuple(weight.shape)}.")
        _explain_misfit(x, None, None, weight.unsqueeze(0))
    if torch.compiler.is_compiling():
        return native_ops.ops().cpu_linear(x, weight)
    return _linear(x, weight)


def weight_dtype_fits(a_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Whether the kernel takes weights of `weight_dtype` under activations of `a_dtype`: the same dtype, or
    bfloat16 under float32."""
    return weight_dtype == a_dtype or (a_dtype == torch.float32 and weight_dtype == torch.bfloat16)


def _fits_dtype(a: torch.Tensor, weights: torch.Tensor) -> bool:
    return _ext is not None and a.dtype in _DTYPE_CODES and weight_dtype_fits(a.dtype, weights.dtype)


def _fits(a: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> bool:
    """Every check of _explain_misfit in one expression: the fast path of every call."""
    return (
        _fits_dtype(a, weights) and a.dim() == 2 and weights.dim() == 3 and a.shape[1] == weights.shape[2]
        and rows.dim() == 1 and rows.dtype == torch.long and slots.dtype == torch.long and rows.shape == slots.shape
        and a.is_cpu and rows.is_cpu and slots.is_cpu and weights.is_cpu and _slots_contiguous(weights)
    )


def _explain_misfit(a, rows, slots, weights) -> None:
    """Raise the ValueError that names the first argument that does not fit (rows, slots None: cpu_linear's)."""
    if not available(a.dtype):
        why = "the extension is not built" if _ext is None else f"it takes float32 and bfloat16, not {a.dtype}"
        raise ValueError(f"the CPU GEMM cannot run: {why}.")
    if a.dim() != 2 or weights.dim() != 3:
        raise ValueError(f"the CPU GEMM needs a [R, Kdim] and weights [S, N, Kdim] (or [N, Kdim] for a linear), "
                         f"got {tuple(a.shape)} and {tuple(weights.shape)}.")
    if a.shape[1] != weights.shape[2]:
        raise ValueError(f"the CPU GEMM: a has {a.shape[1]} features but the weights take {weights.shape[2]}.")
    if not weight_dtype_fits(a.dtype, weights.dtype):
        raise ValueError(f"the CPU GEMM needs the weights in a's dtype (or bfloat16 under float32 a), got {a.dtype} "
                         f"and {weights.dtype}.")
    ids = [] if rows is None else [("rows", rows), ("slots", slots)]
    for name, t in ids:
        if t.dim() != 1 or t.dtype != torch.long:
            raise ValueError(f"the CPU GEMM needs {name} as a 1-D long tensor, got {t.dtype} of shape {tuple(t.shape)}.")
    if rows is not None and rows.shape != slots.shape:
        raise ValueError(f"the CPU GEMM needs one row and one slot per pair, got {rows.shape[0]} rows and "
                         f"{slots.shape[0]} slots.")
    devices = {t.device.type for t in (a, weights, *(t for _, t in ids))}
    if devices != {"cpu"}:
        raise ValueError(f"the CPU GEMM needs every tensor on the CPU, got {sorted(devices)}.")
    raise ValueError(
        f"the CPU GEMM needs each slot's [N, Kdim] weight matrix contiguous, got strides {weights.stride()}."
    )


def contiguous_matrix(weight: torch.Tensor) -> bool:
    """Whether weight [N, Kdim] is contiguous (strides of dims of size 1 do not matter, nor any of an empty one)."""
    n_out, k_dim = weight.shape
    return n_out * k_dim == 0 or ((k_dim == 1 or weight.stride(1) == 1) and (n_out == 1 or weight.stride(0) == k_dim))


def _slots_contiguous(weights: torch.Tensor) -> bool:
    """Whether each weights[s] is a contiguous [N, Kdim] matrix."""
    _, n_out, k_dim = weights.shape
    return n_out * k_dim == 0 or ((k_dim == 1 or weights.stride(2) == 1) and (n_out == 1 or weights.stride(1) == k_dim))


def _features_contiguous(a: torch.Tensor) -> torch.Tensor:
    """a itself when its rows are contiguous (the kernel takes any row stride), else a contiguous copy."""
    return a if a.shape[1] <= 1 or a.stride(1) == 1 else a.contiguous()


def _grouped(a: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    a = _features_contiguous(a)
    rows, slots = rows.contiguous(), slots.contiguous()
    num_slots, n_out, k_dim = weights.shape
    out = torch.empty(rows.shape[0], n_out, dtype=a.dtype)
    _ext.grouped_gemm(
        _DTYPE_CODES[a.dtype], _DTYPE_CODES[weights.dtype], a.data_ptr(), a.shape[0], a.stride(0), weights.data_ptr(),
        num_slots, weights.stride(0), n_out, k_dim, rows.data_ptr(), slots.data_ptr(), rows.shape[0], out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = _features_contiguous(x)
    n_out, k_dim = weight.shape
    out = torch.empty(x.shape[0], n_out, dtype=x.dtype)
    _ext.grouped_gemm(
        _DTYPE_CODES[x.dtype], _DTYPE_CODES[weight.dtype], x.data_ptr(), x.shape[0], x.stride(0), weight.data_ptr(),
        1, 0, n_out, k_dim, 0, 0, x.shape[0], out.data_ptr(), torch.get_num_threads(),
    )
    return out


# The ops torch.compile sees (inductor calls them as extern kernels). Each repeats the layout checks that a
# compiled graph could break by handing it tensors laid out otherwise than the traced ones.


# Plain CPU kernels of a library fragment rather than torch.library.custom_op: a compiled decode step calls
# them a few times per layer, and custom_op's wrappers (autograd, defaults) cost more than a small product.
_library = torch.library.Library("moeserve", "FRAGMENT")
_library.define("cpu_grouped_gemm(Tensor a, Tensor rows, Tensor slots, Tensor weights) -> Tensor")
_library.define("cpu_linear(Tensor x, Tensor weight) -> Tensor")


def _grouped_op(a: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    if not _fits(a, rows, slots, weights):
        _explain_misfit(a, rows, slots, weights)
    return _grouped(a, rows, slots, weights)


def _linear_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if not contiguous_matrix(weight):
        _explain_misfit(x, None, None, weight.unsqueeze(0))
    return _linear(x, weight)


_library.impl("cpu_grouped_gemm", _grouped_op, "CPU")
_library.impl("cpu_linear", _linear_op, "CPU")
torch.library.register_fake(
    "moeserve::cpu_grouped_gemm", lambda a, rows, slots, weights: a.new_empty(rows.shape[0], weights.shape[1]), lib=_library
)
torch.library.register_fake("moeserve::cpu_linear", lambda x, weight: x.new_empty(x.shape[0], weight.shape[0]), lib=_library)
