"""grouped_gemm and align_pairs against a per-pair F.linear reference, on SlotPool-shaped strided weights.

Row independence (a pair's result, bit for bit, does not depend on the other pairs of the call) is checked
on the CPU path at 1 and 2 threads and under other ATEN_CPU_CAPABILITY values, in the Triton interpreter
(a TRITON_INTERPRET=1 subprocess, since the variable must be set before triton is imported) and on CUDA.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from early_runs import EarlyRun
from triton_interpreter import (
    HAS_TRITON,
    INTERPRETED,
    assert_interpreted_tests_pass,
    interpreter_only,
    requires_cuda_triton,
)
from moeserve.experts import expert_row_numel, expert_rows
from moeserve.layers.grouped_gemm import align_pairs, grouped_gemm, max_padded_pairs

TESTS = Path(__file__).parent
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Relative tolerance: one rounding of the output to the dtype, plus float32 accumulation-order noise.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-10}
# triton 3.9's interpreter casts float32 to bfloat16 by truncation (a GPU rounds to nearest): one ulp.
RTOL_INTERPRETED = {**RTOL, torch.bfloat16: 2**-7}


def slot_pool_views(num_slots: int, hidden: int, intermediate: int, dtype, device="cpu", seed=0):
    """gate_up [S, 2I, D] and down [S, D, I] viewed out of one [S, expert_row_numel] memory, exactly as SlotPool
    lays it (experts.expert_rows)."""
    gen = torch.Generator().manual_seed(seed)
    row = expert_row_numel(intermediate, hidden, dtype)
    memory = (torch.randn(num_slots, row, generator=gen) / hidden**0.5).to(dtype).to(device)
    return expert_rows(memory, intermediate, hidden)


def random_pairs(num_pairs: int, num_rows: int, num_slots: int, seed: int, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, num_rows, (num_pairs,), generator=gen)
    slots = torch.randint(0, num_slots, (num_pairs,), generator=gen)
    return rows.to(device), slots.to(device)


def per_pair_linear(a, rows, slots, weights) -> torch.Tensor:
    """The plain reference: one F.linear per pair, in float32."""
    pairs = zip(rows.tolist(), slots.tolist())
    return torch.stack([F.linear(a[r].float(), weights[s].float()) for r, s in pairs])  # [P, N]


def assert_matches_reference(out, a, rows, slots, weights, rtol=RTOL):
    expected = per_pair_linear(a.cpu(), rows.cpu(), slots.cpu(), weights.cpu())
    assert out.dtype == a.dtype and out.shape == expected.shape
    torch.testing.assert_close(out.float().cpu(), expected, rtol=rtol[a.dtype], atol=1e-4)


def assert_rows_independent(run, a, rows, slots, weights, seed: int):
    """`run(a, rows, slots, weights)` gives every pair the same bits alone, in subsets and permuted."""
    full = run(a, rows, slots, weights)
    num_pairs = rows.shape[0]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_pairs, generator=gen).to(rows.device)
    assert torch.equal(run(a, rows[perm], slots[perm], weights), full[perm]), "permuted pairs changed bits"
    cuts = sorted(torch.randperm(num_pairs - 1, generator=gen)[:2].add(1).tolist())
    for part in torch.tensor_split(perm, cuts):  # the pairs in three calls, as an offloaded provider might
        assert torch.equal(run(a, rows[part], slots[part], weights), full[part]), f"a call over {len(part)} pairs changed bits"
    for p in (0, num_pairs - 1):
        assert torch.equal(run(a, rows[p : p + 1], slots[p : p + 1], weights), full[p : p + 1]), f"pair {p} alone changed bits"


# -- align_pairs ------------------------------------------------------------------------------------


def expected_alignment(slots: list[int], num_slots: int, block_m: int):
    """sorted_pairs, block_slot and padded_total built with Python lists, straight from the definition."""
    sorted_pairs, block_slot = [], []
    for slot in range(num_slots):
        group = [p for p, s in enumerate(slots) if s == slot]
        if group:
            padded = -(-len(group) // block_m) * block_m
            sorted_pairs += group + [len(slots)] * (padded - len(group))
            block_slot += [slot] * (padded // block_m)
    padded_total = len(sorted_pairs)
    max_padded = max_padded_pairs(len(slots), num_slots, block_m)
    sorted_pairs += [len(slots)] * (max_padded - padded_total)
    block_slot += [num_slots] * (max_padded // block_m - len(block_slot))
    return sorted_pairs, block_slot, padded_total


@pytest.mark.parametrize(
    "num_pairs, num_slots, block_m, seed",
    [(1, 4, 16, 0), (6, 8, 16, 1), (40, 3, 16, 2), (37, 64, 4, 3), (20, 5, 1, 4), (0, 4, 16, 5)],
)
def test_align_pairs_groups_pairs_by_slot_padded_to_block_m(num_pairs, num_slots, block_m, seed):
    _, slots = random_pairs(num_pairs, 1, num_slots, seed)
    alignment = align_pairs(slots, num_slots, block_m)
    sorted_pairs, block_slot, padded_total = expected_alignment(slots.tolist(), num_slots, block_m)
    assert alignment.sorted_pairs.tolist() == sorted_pairs
    assert alignment.block_slot.tolist() == block_slot
    assert alignment.padded_total.tolist() == [padded_total]
    assert (alignment.num_pairs, alignment.num_slots, alignment.block_m) == (num_pairs, num_slots, block_m)


def test_align_pairs_fills_the_worst_case_exactly():
    # Every slot used once: each pads block_m - 1, the bound max_padded_pairs is reached.
    alignment = align_pairs(torch.tensor([3, 0, 2, 1]), num_slots=4, block_m=16)
    assert alignment.padded_total.item() == alignment.sorted_pairs.numel() == max_padded_pairs(4, 4, 16) == 64


# -- the CPU (reference) path -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_pairs, num_rows, num_slots, hidden, intermediate",
    [(1, 1, 4, 32, 16), (7, 5, 3, 24, 40), (29, 11, 6, 72, 20)],
)
def test_reference_path_matches_per_pair_linear_on_slot_pool_views(dtype, num_pairs, num_rows, num_slots, hidden, intermediate):
    gate_up, down = slot_pool_views(num_slots, hidden, intermediate, dtype)
    rows, slots = random_pairs(num_pairs, num_rows, num_slots, seed=num_pairs)
    x = torch.randn(num_rows, hidden).to(dtype)
    h = grouped_gemm(x, rows, slots, gate_up)  # [P, 2I]
    assert_matches_reference(h, x, rows, slots, gate_up)
    act = h[:, :intermediate]  # [P, I], a strided view: the down GEMM reads its own pair's row
    out = torch.empty(num_pairs, hidden, dtype=dtype)
    assert grouped_gemm(act, torch.arange(num_pairs), slots, down, out) is out
    assert_matches_reference(out, act, torch.arange(num_pairs), slots, down)


@pytest.mark.exact
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_path_rows_are_independent(threads, dtype):
    gate_up, down = slot_pool_views(6, 96, 80, dtype)
    rows, slots = random_pairs(24, 9, 6, seed=7)
    x = torch.randn(9, 96).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_rows_independent(grouped_gemm, x, rows, slots, gate_up, seed=1)
        assert_rows_independent(grouped_gemm, torch.randn(24, 80).to(dtype), torch.arange(24), slots, down, seed=2)
    finally:
        torch.set_num_threads(before)


CAPABILITIES = ("default", "avx2")


@pytest.fixture(scope="module")
def capability_runs() -> dict[str, subprocess.CompletedProcess]:
    """One run per capability, started together: each spends seconds starting torch and collecting on one core,
    so side by side on 2 cores they take little more than one."""
    runs = {
        capability: EarlyRun(["-k", "rows_are_independent and not capability", str(TESTS / "test_grouped_gemm.py")],
                             {"ATEN_CPU_CAPABILITY": capability})
        for capability in CAPABILITIES
    }
    for run in runs.values():
        run.start()
    return {capability: run.result() for capability, run in runs.items()}


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_reference_path_rows_are_independent_at_another_cpu_capability(capability_runs, capability):
    result = capability_runs[capability]
    assert result.returncode == 0, f"at ATEN_CPU_CAPABILITY={capability}:\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
    assert "6 passed" in result.stdout.splitlines()[-1]


def test_reference_path_and_align_pairs_compile_without_graph_breaks():
    # fullgraph=True fails on any graph break (a host sync, a data-dependent shape); the aot_eager backend
    # captures and functionalizes the graph like inductor does, without inductor's C++ compile (~6 s warm,
    # ~40 s with a cold cache on 2 cores).
    gate_up, _ = slot_pool_views(4, 32, 24, torch.float32)
    rows, slots = random_pairs(6, 3, 4, seed=3)
    x = torch.randn(3, 32)

    def step(x, rows, slots):
        alignment = align_pairs(slots, 4)
        return grouped_gemm(x, rows, slots, gate_up), alignment.sorted_pairs, alignment.block_slot, alignment.padded_total

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, rows, slots), step(x, rows, slots), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "args, message",
    [
        (lambda x, r, s, w: (x[:, :5], r, s, w), "features"),
        (lambda x, r, s, w: (x.half(), r, s, w), "float32, bfloat16, float16"),
        (lambda x, r, s, w: (x, r.int(), s, w), "rows as a 1-D long"),
        (lambda x, r, s, w: (x, r, s[:-1], w), "one row and one slot per pair"),
        (lambda x, r, s, w: (x, r, s, w.transpose(1, 2).contiguous().transpose(1, 2)), "contiguous"),
        (lambda x, r, s, w: (x, r, s, w, torch.empty(3, 2)), "out as"),
    ],
)
def test_misuse_is_a_clear_value_error(args, message):
    gate_up, _ = slot_pool_views(2, 8, 4, torch.float32)
    rows, slots = random_pairs(4, 2, 2, seed=0)
    with pytest.raises(ValueError, match=message):
        grouped_gemm(*args(torch.randn(2, 8), rows, slots, gate_up))


def test_an_alignment_for_other_pairs_is_refused():
    gate_up, _ = slot_pool_views(2, 8, 4, torch.float32)
    rows, slots = random_pairs(4, 2, 2, seed=0)
    with pytest.raises(ValueError, match="alignment is for 3 pairs"):
        grouped_gemm(torch.randn(2, 8), rows, slots, gate_up, alignment=align_pairs(slots[:3], 2))


# -- the Triton kernel, interpreted on CPU --------------------------------------------------------------


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton, or the test extra)")
@pytest.mark.skipif(INTERPRETED, reason="this is the driver of the interpreted run")
def test_triton_interpreter_subprocess():
    assert_interpreted_tests_pass(Path(__file__), "interpreted_kernel")


@interpreter_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_pairs, num_rows, num_slots, hidden, intermediate", [(1, 1, 3, 16, 8), (19, 6, 4, 40, 24)])
def test_interpreted_kernel_matches_per_pair_linear(dtype, num_pairs, num_rows, num_slots, hidden, intermediate):
    gate_up, down = slot_pool_views(num_slots, hidden, intermediate, dtype)
    rows, slots = random_pairs(num_pairs, num_rows, num_slots, seed=num_pairs)
    x = torch.randn(num_rows, hidden).to(dtype)
    h = grouped_gemm(x, rows, slots, gate_up, force_triton=True)
    assert_matches_reference(h, x, rows, slots, gate_up, RTOL_INTERPRETED)
    act = torch.randn(num_pairs, intermediate).to(dtype)
    out = torch.zeros(num_pairs, 2 * hidden, dtype=dtype)[:, ::2]  # a strided out
    alignment = align_pairs(slots, num_slots, block_m=32)  # not the default 16; passed in, as the MoE block reuses one
    grouped_gemm(act, torch.arange(num_pairs), slots, down, out, alignment=alignment, force_triton=True)
    assert_matches_reference(out, act, torch.arange(num_pairs), slots, down, RTOL_INTERPRETED)


@pytest.mark.skipif(not HAS_TRITON or INTERPRETED, reason="needs triton, not interpreted")
def test_triton_path_on_cpu_tensors_without_the_interpreter_is_refused():
    gate_up, _ = slot_pool_views(2, 16, 8, torch.float32)
    rows, slots = random_pairs(3, 2, 2, seed=0)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        grouped_gemm(torch.randn(2, 16), rows, slots, gate_up, force_triton=True)


@interpreter_only
def test_interpreted_kernel_refuses_a_block_smaller_than_a_tensor_core_tile():
    gate_up, _ = slot_pool_views(2, 16, 8, torch.float32)
    rows, slots = random_pairs(3, 2, 2, seed=0)
    with pytest.raises(ValueError, match="power of two >= 16"):
        grouped_gemm(torch.randn(2, 16), rows, slots, gate_up, alignment=align_pairs(slots, 2, 8), force_triton=True)


@interpreter_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_interpreted_kernel_rows_are_independent(dtype):
    gate_up, _ = slot_pool_views(3, 40, 20, dtype)
    rows, slots = random_pairs(21, 5, 3, seed=4)
    x = torch.randn(5, 40).to(dtype)
    assert_rows_independent(lambda *args: grouped_gemm(*args, force_triton=True), x, rows, slots, gate_up, seed=5)


# -- the Triton kernel, compiled for a GPU (no GPU needed: triton ships ptxas) -------------------------------


@pytest.mark.skipif(not HAS_TRITON or INTERPRETED, reason="needs triton, not interpreted")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_out, k_dim", [(28672, 4096), (4096, 14336)])  # Mixtral-8x7b's gate_up and down
def test_kernel_compiles_for_hopper(dtype, n_out, k_dim):
    """Catches what the interpreter does not check: the kernel lowers to sm_90 code, 16-bit dots on the
    tensor cores (mma) and float32 ones on the FMA units (IEEE, no TF32)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moeserve.layers.grouped_gemm_triton import _grouped_gemm_kernel, tile_config

    config = tile_config(n_out, k_dim, dtype)
    element = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    types = [element] * 3 + ["*i64"] * 4 + ["i32"] * 5 + ["i64"] + ["i32"] * 3  # the slot stride can pass 2**31
    names = _grouped_gemm_kernel.arg_names
    constants = dict(BLOCK_M=16, BLOCK_N=config.block_n, BLOCK_K=config.block_k, DOT_IN_FP32=dtype == torch.float32)
    signature = {**dict(zip(names, types)), **{name: "constexpr" for name in constants}}
    source = ASTSource(_grouped_gemm_kernel, signature, {(names.index(n),): v for n, v in constants.items()})
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": False}  # as launched
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    assert ("mma.sync" in ptx) == (dtype != torch.float32)
    assert "tf32" not in ptx


# -- CUDA ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_pairs, hidden, intermediate", [(2, 256, 96), (16, 320, 200), (300, 128, 64)])
def test_cuda_kernel_matches_per_pair_linear(dtype, num_pairs, hidden, intermediate):
    gate_up, down = slot_pool_views(8, hidden, intermediate, dtype, device="cuda")
    rows, slots = random_pairs(num_pairs, 7, 8, seed=num_pairs, device="cuda")
    x = torch.randn(7, hidden, device="cuda").to(dtype)
    assert_matches_reference(grouped_gemm(x, rows, slots, gate_up), x, rows, slots, gate_up)
    act = torch.randn(num_pairs, intermediate, device="cuda").to(dtype)
    pairs = torch.arange(num_pairs, device="cuda")
    assert_matches_reference(grouped_gemm(act, pairs, slots, down), act, pairs, slots, down)


@pytest.mark.gpu
@requires_cuda_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_rows_are_independent(dtype):
    gate_up, _ = slot_pool_views(8, 512, 320, dtype, device="cuda")
    rows, slots = random_pairs(64, 16, 8, seed=6, device="cuda")
    x = torch.randn(16, 512, device="cuda").to(dtype)
    assert_rows_independent(grouped_gemm, x, rows, slots, gate_up, seed=7)


@pytest.mark.gpu
@requires_cuda_triton
def test_cuda_kernel_replays_in_a_cuda_graph_with_new_ids():
    gate_up, _ = slot_pool_views(8, 256, 128, torch.bfloat16, device="cuda")
    rows, slots = random_pairs(12, 4, 8, seed=8, device="cuda")
    x = torch.randn(4, 256, device="cuda").bfloat16()
    out = torch.empty(12, 256, device="cuda", dtype=torch.bfloat16)
    grouped_gemm(x, rows, slots, gate_up, out)  # compiles the kernel outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grouped_gemm(x, rows, slots, gate_up, out)
    new_rows, new_slots = random_pairs(12, 4, 8, seed=9, device="cuda")
    rows.copy_(new_rows)
    slots.copy_(new_slots)
    graph.replay()
    assert torch.equal(out, grouped_gemm(x, new_rows, new_slots, gate_up))
