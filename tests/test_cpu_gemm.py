"""The CPU grouped GEMM kernel (moeserve._cpu_gemm through moeserve/layers/cpu_gemm.py).

What is checked, on fresh random inputs (seeded per test, so a failure reproduces):
- its one summation order: every path this CPU has (AVX-512F, AVX2+FMA, scalar) writes the same bytes, and
  those bytes are the ones of a numpy emulation of the order that shares no code with the C++ (below);
- accuracy against a float64 reference, within a rigorous bound derived from Kdim and the dtype;
- row independence: a pair's bits alone, among other pairs and slots, in any order and at 1, 2 or 3 threads;
- layouts: strided slot views (experts.expert_rows), strided activation rows, Kdim not a multiple of 16, N
  not a multiple of any row tile, pair counts that leave partial pair tiles;
- bfloat16: the result is the float32 result rounded by torch (nearest even, NaN canonical);
- torch.compile(fullgraph=True) through inductor, where both ops are extern calls;
- misuse as clear ValueErrors, MOESERVE_CPU_ISA, layers.linear.Linear, and that the MoE block's CPU steps
  compute experts through the kernel.
Every module-level check skips when the extension is not built (python setup.py build_ext --inplace).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip(
    "moeserve._cpu_gemm", reason="the CPU GEMM extension is not built (python setup.py build_ext --inplace)"
)

from moeserve.experts import expert_row_numel, expert_rows  # noqa: E402
from moeserve.layers import cpu_gemm  # noqa: E402
from moeserve.layers.cpu_gemm import cpu_grouped_gemm, cpu_linear  # noqa: E402
from moeserve.layers.grouped_gemm import GROUPED_GEMM_MAX_TOKENS, grouped_gemm, reference_grouped_gemm  # noqa: E402
from moeserve.layers.linear import Linear, linear  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)
ISAS = cpu_gemm.supported_isas()  # scalar always; avx2 and avx512 where the CPU has them
# (pairs, activation rows, slots, N, Kdim): partial tiles everywhere (4 and 2 pairs per tile, 4 and 2 rows
# per tile, 8 rows per pair sweep, 16 rows per work item), Kdim tails of 1..15 and none
SHAPES = [(1, 1, 1, 1, 1), (1, 1, 1, 5, 7), (3, 2, 1, 9, 16), (5, 3, 2, 13, 33), (7, 5, 3, 37, 100),
          (9, 4, 2, 18, 47), (11, 6, 4, 40, 64)]


@pytest.fixture
def each_isa():
    """Runs the test body per path with `use(isa)`; the process's path is restored afterwards."""
    before = cpu_gemm.isa()
    yield cpu_gemm.set_isa
    cpu_gemm.set_isa(before)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def problem(pairs, num_rows, num_slots, n_out, k_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(num_rows, k_dim, generator=gen).to(dtype)
    weights = (torch.randn(num_slots, n_out, k_dim, generator=gen) / k_dim**0.5).to(dtype)
    rows = torch.randint(0, num_rows, (pairs,), generator=gen)
    slots = torch.randint(0, num_slots, (pairs,), generator=gen)
    return a, rows, slots, weights


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(bits(got), bits(want)), f"{what}: {int((bits(got) != bits(want)).sum())} values differ"


# -- an emulation of the order, independent of the C++ ---------------------------------------------------------
#
# fmaf(a, b, c) exactly, from float64: a*b of two float32 is exact in float64 (48 <= 53 significant bits), but
# rounding the float64 sum p + c to float64 and then to float32 can round twice the wrong way. Rounding the
# sum to odd instead (s = p + c to nearest, then, if inexact and s's last bit is even, s moved one ulp toward
# the exact sum) and then to float32 to nearest is correct rounding (Boldo & Melquiond, "Emulation of FMA and
# correctly rounded sums: proved algorithms using rounding to odd", IEEE TC 2008: odd rounding at >= p + 2
# bits, here 53 >= 24 + 2). The exact error of s comes from TwoSum (Knuth), exact without overflow.


def fmaf(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = p + c64
    bv = s - p
    err = (p - (s - bv)) + (c64 - bv)  # p + c = s + err exactly
    even = (s.view(np.int64) & 1) == 0
    toward = np.where(err > 0, np.inf, -np.inf)
    odd = np.where((err != 0) & even, np.nextafter(s, toward), s)
    return odd.astype(np.float32)


def emulate(a: torch.Tensor, rows, slots, weights: torch.Tensor) -> torch.Tensor:
    """The order of cpu_gemm.h in numpy: 16 float32 lanes of fused multiply-adds in increasing k, the
    lane tree (+8, +4, +2, +1), then torch's rounding to the dtype."""
    a32, w32 = a.float().numpy(), weights.float().numpy()
    out = []
    for r, s in zip(rows.tolist(), slots.tolist()):
        x, w = a32[r], w32[s]  # [K], [N, K]
        lanes = np.zeros((w.shape[0], 16), dtype=np.float32)
        for start in range(0, w.shape[1], 16):
            width = min(16, w.shape[1] - start)  # a tail adds its real elements only
            lanes[:, :width] = fmaf(np.broadcast_to(x[start : start + width], (w.shape[0], width)),
                                    w[:, start : start + width], lanes[:, :width])
        for half in (8, 4, 2, 1):
            lanes[:, :half] = lanes[:, :half] + lanes[:, half : 2 * half]
        out.append(lanes[:, 0])
    return torch.from_numpy(np.stack(out)).to(a.dtype)


def test_fmaf_emulation_rounds_once():
    # a*b = 2**-24 - 2**-60 exactly; c = 1 + 2**-23. The exact sum lies just below the float32 midpoint
    # 1 + 2**-23 + 2**-24, so one rounding gives 1 + 2**-23. A float64 sum first drops the 2**-60 and lands on
    # the midpoint, which then rounds to even, 1 + 2**-22: the double rounding the emulation must avoid.
    a = np.array([(1 - 2**-18) * 2**-12], dtype=np.float32)
    b = np.array([(1 + 2**-18) * 2**-12], dtype=np.float32)
    c = np.array([1 + 2**-23], dtype=np.float32)
    naive = (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)
    assert naive[0] == np.float32(1 + 2**-22)
    assert fmaf(a, b, c)[0] == np.float32(1 + 2**-23)
    assert fmaf(-a, b, -c)[0] == np.float32(-(1 + 2**-23))
    # exact sums stay exact, zeros keep IEEE signs
    assert fmaf(np.float32([3.0]), np.float32([0.5]), np.float32([0.25]))[0] == np.float32(1.75)


@pytest.mark.exact
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_path_writes_the_emulated_bits(each_isa, dtype, shape):
    a, rows, slots, weights = problem(*shape, dtype, seed=sum(shape))
    want = emulate(a, rows, slots, weights)
    for isa in ISAS:
        each_isa(isa)
        assert_same_bits(cpu_grouped_gemm(a, rows, slots, weights), want, isa)


@pytest.mark.exact
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_out, k_dim", [(67, 1000), (256, 1024), (130, 2880)])
def test_every_path_writes_the_same_bits_at_model_sizes(each_isa, threads, dtype, n_out, k_dim):
    a, rows, slots, weights = problem(12, 5, 4, n_out, k_dim, dtype, seed=n_out)
    threads(2)
    results = {}
    for isa in ISAS:
        each_isa(isa)
        results[isa] = cpu_grouped_gemm(a, rows, slots, weights)
    for isa, got in results.items():
        assert_same_bits(got, results["scalar"], f"{isa} against scalar")


@pytest.mark.exact
@pytest.mark.parametrize("shape", SHAPES + [(12, 5, 4, 67, 1000), (6, 3, 3, 256, 1024)], ids=str)
def test_bfloat16_weights_under_float32_give_the_float32_weights_bits(each_isa, threads, shape):
    # An expert cache slot holds bfloat16-exact weights as bfloat16 (offload/cache.py slot_dtype): the kernel
    # widens them exactly, so every path must write the bits of the same values held in float32.
    a, rows, slots, weights = problem(*shape, torch.bfloat16, seed=7 + sum(shape))
    a = torch.randn(a.shape, generator=torch.Generator().manual_seed(sum(shape)))  # float32 activations
    want = emulate(a, rows, slots, weights.float())
    threads(2)
    for isa in ISAS:
        each_isa(isa)
        assert_same_bits(cpu_grouped_gemm(a, rows, slots, weights), want, f"{isa}, grouped")
        assert_same_bits(cpu_grouped_gemm(a, rows, slots, weights.float()), want, f"{isa}, float32 weights")
        assert_same_bits(cpu_linear(a, weights[1 % weights.shape[0]]),
                         cpu_linear(a, weights[1 % weights.shape[0]].float()), f"{isa}, linear")


# -- accuracy -----------------------------------------------------------------------------------------------


def error_bound(a, rows, slots, weights) -> torch.Tensor:
    """|out - exact| <= gamma_m * sum_k |a_k w_k| (+ the output rounding for bfloat16), per output. m = the
    float32 operations on the longest path to an output: ceil(Kdim / 16) fused multiply-adds in a lane, then
    4 additions of the tree; gamma_m = m u / (1 - m u), u = 2**-24 (Higham, Accuracy and Stability of
    Numerical Algorithms, 2nd ed., sec. 3.1). bfloat16 adds one rounding of the result: 2**-8 |result|."""
    k_dim = weights.shape[2]
    m = -(-k_dim // 16) + 4
    u = 2.0**-24
    gamma = m * u / (1 - m * u)
    magnitude = torch.bmm(a[rows].double().abs().unsqueeze(1), weights[slots].double().abs().transpose(1, 2)).squeeze(1)
    exact = torch.bmm(a[rows].double().unsqueeze(1), weights[slots].double().transpose(1, 2)).squeeze(1)
    bound = gamma * magnitude
    if a.dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * (exact.abs() + bound)
    return bound


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(6, 3, 2, 300, 4096), (16, 16, 1, 96, 2880), (40, 9, 8, 24, 511)], ids=str)
def test_within_the_float32_error_bound_of_a_float64_reference(dtype, shape):
    a, rows, slots, weights = problem(*shape, dtype, seed=7 + shape[0])
    out = cpu_grouped_gemm(a, rows, slots, weights)
    exact = torch.bmm(a[rows].double().unsqueeze(1), weights[slots].double().transpose(1, 2)).squeeze(1)
    excess = (out.double() - exact).abs() - error_bound(a, rows, slots, weights)
    assert excess.max().item() <= 0, f"the error passes the bound by {excess.max().item()}"


@pytest.mark.exact
def test_bfloat16_is_the_float32_result_rounded_by_torch():
    # bfloat16 inputs widen to float32 exactly and are summed in the float32 order, so the bfloat16 result
    # must be torch's rounding (nearest, ties to even) of the float32 result on the same values
    a, rows, slots, weights = problem(31, 7, 5, 45, 200, torch.bfloat16, seed=3)
    want = cpu_grouped_gemm(a.float(), rows, slots, weights.float()).to(torch.bfloat16)
    assert_same_bits(cpu_grouped_gemm(a, rows, slots, weights), want)
    # ties on purpose: 1 + 2**-8 rounds down to even 1, 1 + 2**-7 + 2**-8 up to 1 + 2**-6. A NaN becomes 0x7fc0,
    # as c10::BFloat16 rounds one value (torch's vectorized conversion writes 0xffff instead: torch has no one
    # NaN pattern, so NaN bits are not part of the match)
    x = torch.tensor([[1.0, 2.0**-8], [1 + 2.0**-7, 2.0**-8], [float("inf"), 1.0]], dtype=torch.bfloat16)
    w = torch.tensor([[[1.0, 1.0]], [[0.0, 1.0]]], dtype=torch.bfloat16)
    rows, slots = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1])
    got = cpu_grouped_gemm(x, rows, slots, w)
    assert got[:2, 0].tolist() == [1.0, 1 + 2.0**-6]
    assert bits(got[2:]).tolist() == [[0x7FC0]]  # inf * 0 + 1


# -- row independence -----------------------------------------------------------------------------------------


def assert_rows_independent(a, rows, slots, weights, seed: int):
    full = cpu_grouped_gemm(a, rows, slots, weights)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(rows.shape[0], generator=gen)
    assert_same_bits(cpu_grouped_gemm(a, rows[perm], slots[perm], weights), full[perm], "permuted")
    cuts = sorted(torch.randperm(rows.shape[0] - 1, generator=gen)[:2].add(1).tolist())
    for part in torch.tensor_split(perm, cuts):
        assert_same_bits(cpu_grouped_gemm(a, rows[part], slots[part], weights), full[part], f"{len(part)} pairs")
    for p in range(rows.shape[0]):
        alone = cpu_grouped_gemm(a, rows[p : p + 1], slots[p : p + 1], weights)
        assert_same_bits(alone, full[p : p + 1], f"pair {p} alone")
        assert_same_bits(cpu_linear(a[rows[p : p + 1]], weights[slots[p]]), full[p : p + 1], f"pair {p} as a linear")
    return full


@pytest.mark.exact
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_pairs_bits_depend_on_nothing_else(threads, dtype):
    # 4 slots of 256 x 256: big enough for the parallel path (it starts at 256 KiB of weights per call)
    a, rows, slots, weights = problem(21, 6, 4, 256, 256 + 9, dtype, seed=11)
    results = []
    for count in (1, 2, 3):
        threads(count)
        results.append(assert_rows_independent(a, rows, slots, weights, seed=count))
    for count, got in zip((2, 3), results[1:]):
        assert_same_bits(got, results[0], f"{count} threads against 1")


# -- layouts ----------------------------------------------------------------------------------------------------


@pytest.mark.exact
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_views_give_the_contiguous_bits(dtype):
    gen = torch.Generator().manual_seed(5)
    hidden, intermediate, num_slots = 72, 40, 5
    memory = torch.randn(num_slots, expert_row_numel(intermediate, hidden, dtype), generator=gen).to(dtype)
    gate_up, down = expert_rows(memory, intermediate, hidden)  # slot stride expert_row_numel
    assert not gate_up.is_contiguous() and not down.is_contiguous()
    x = torch.randn(3, hidden, generator=gen).to(dtype)
    rows, slots = torch.randint(0, 3, (9,), generator=gen), torch.randint(0, num_slots, (9,), generator=gen)
    h = cpu_grouped_gemm(x, rows, slots, gate_up)
    assert_same_bits(h, cpu_grouped_gemm(x, rows, slots, gate_up.contiguous()), "gate_up view")
    act = h[:, :intermediate]  # activation rows with a row stride of 2I
    pairs = torch.arange(9)
    want = cpu_grouped_gemm(act.contiguous(), pairs, slots, down.contiguous())
    assert_same_bits(cpu_grouped_gemm(act, pairs, slots, down), want, "strided activation rows, down view")
    transposed = torch.randn(hidden, 4, generator=gen).to(dtype).t()  # features not contiguous: copied first
    weight = down[0].t().contiguous()  # [I, D]
    assert_same_bits(cpu_linear(transposed, weight), cpu_linear(transposed.contiguous(), weight), "transposed x")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_gemm_on_a_cpu_runs_the_kernel_and_matches_the_reference(dtype):
    a, rows, slots, weights = problem(13, 4, 3, 50, 90, dtype, seed=2)
    got = grouped_gemm(a, rows, slots, weights)
    assert_same_bits(got, cpu_grouped_gemm(a, rows, slots, weights))
    torch.testing.assert_close(got.float(), reference_grouped_gemm(a, rows, slots, weights).float(),
                               rtol={torch.float32: 1e-5, torch.bfloat16: 2**-7}[dtype], atol=1e-4)
    out = torch.empty(13, 50, dtype=dtype)
    assert grouped_gemm(a, rows, slots, weights, out) is out and torch.equal(out, got)


def test_empty_and_degenerate_sizes():
    a, rows, slots, weights = problem(3, 2, 2, 5, 8, torch.float32, seed=0)
    assert cpu_grouped_gemm(a, rows[:0], slots[:0], weights).shape == (0, 5)
    assert cpu_grouped_gemm(a, rows, slots, weights[:, :0]).shape == (3, 0)
    zero_k = cpu_grouped_gemm(a[:, :0], rows, slots, weights[:, :, :0])
    assert torch.equal(zero_k, torch.zeros(3, 5))


# -- torch.compile -----------------------------------------------------------------------------------------------


@pytest.mark.exact
# inductor's own modules call torch.jit.script_method as they load; moeserve's compile (compiled_decode.py) hides
# their notes the same way
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiles_whole_through_inductor_as_extern_calls(tmp_path, monkeypatch):
    # A cache of its own: inductor's cache key leaves out ATEN_CPU_CAPABILITY (see test_decode_compile.py).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    import torch._dynamo

    gen = torch.Generator().manual_seed(9)
    memory = torch.randn(4, expert_row_numel(24, 48, torch.float32), generator=gen)
    gate_up, down = expert_rows(memory, 24, 48)
    dense = torch.randn(32, 48, generator=gen)

    def step(x, rows, slots):
        h = cpu_grouped_gemm(x, rows, slots, gate_up)  # [P, 48]
        act = F.silu(h[:, :24]) * h[:, 24:]
        y = cpu_grouped_gemm(act, torch.arange(rows.shape[0]), slots, down)  # [P, 48]
        return y, cpu_linear(x, dense)

    x = torch.randn(3, 48, generator=gen)
    rows, slots = torch.tensor([0, 1, 2, 0, 2]), torch.tensor([3, 0, 3, 1, 2])
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    got, want = compiled(x, rows, slots), step(x, rows, slots)
    assert_same_bits(got[1], want[1], "cpu_linear")
    # inductor may fuse SiLU * up into other instructions than eager's: y agrees to float32 rounding
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    new_rows, new_slots = torch.tensor([2, 2, 1, 0, 1]), torch.tensor([0, 1, 2, 3, 0])
    with torch._dynamo.config.patch(error_on_recompile=True):  # new ids, same graph
        got = compiled(x, new_rows, new_slots)
    torch.testing.assert_close(got[0], step(x, new_rows, new_slots)[0], rtol=1e-5, atol=1e-6)


# -- misuse and the path switch --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (lambda a, r, s, w: (a.half(), r, s, w.half()), "float32 and bfloat16, not torch.float16"),
        (lambda a, r, s, w: (a.bfloat16(), r, s, w), "weights in a's dtype"),
        (lambda a, r, s, w: (a[:, :5], r, s, w), "features"),
        (lambda a, r, s, w: (a, r.int(), s, w), "rows as a 1-D long"),
        (lambda a, r, s, w: (a, r, s[:-1], w), "one row and one slot per pair"),
        (lambda a, r, s, w: (a, r, s, w.transpose(1, 2).contiguous().transpose(1, 2)), "contiguous"),
        (lambda a, r, s, w: (a, r, s, w[:, ::2]), "contiguous"),
        (lambda a, r, s, w: (a, r + 2, s, w), "reads row 2 of 2"),
        (lambda a, r, s, w: (a, r, s - 1, w), "uses slot -1 of 2"),
    ],
)
def test_misuse_is_a_clear_value_error(args, message):
    a, rows, slots, weights = problem(4, 2, 2, 6, 8, torch.float32, seed=0)
    rows, slots = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 0, 1, 0])
    with pytest.raises(ValueError, match=message):
        cpu_grouped_gemm(*args(a, rows, slots, weights))


def test_the_path_can_be_forced_and_unknown_paths_are_refused(each_isa):
    assert cpu_gemm.isa() in ISAS and "scalar" in ISAS
    for isa in ISAS:
        each_isa(isa)
        assert cpu_gemm.isa() == isa
    with pytest.raises(ValueError, match="unknown CPU GEMM path 'sse'"):
        cpu_gemm.set_isa("sse")
    for missing in {"avx2", "avx512"} - set(ISAS):
        with pytest.raises(ValueError, match="cannot run"):
            cpu_gemm.set_isa(missing)
    each_isa("auto")
    assert cpu_gemm.isa() == ISAS[-1]  # the widest


def test_moeserve_cpu_isa_picks_the_path_at_import():
    probe = "from moeserve.layers import cpu_gemm; print(cpu_gemm.isa())"
    run = lambda value: subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                       env={**os.environ, "MOESERVE_CPU_ISA": value})  # noqa: E731
    assert run("scalar").stdout.strip() == "scalar"
    bad = run("sse")
    assert bad.returncode != 0 and "MOESERVE_CPU_ISA: unknown CPU GEMM path 'sse'" in bad.stderr


# -- layers.linear.Linear -------------------------------------------------------------------------------------


@pytest.mark.exact
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_runs_the_kernel_up_to_the_token_limit(dtype):
    torch.manual_seed(4)
    layer = Linear(40, 24, bias=True).to(dtype)
    plain = torch.nn.Linear(40, 24, bias=True).to(dtype)
    plain.load_state_dict(layer.state_dict())  # the same parameters, the same state dict
    with torch.no_grad():
        x = torch.randn(2, 3, 40).to(dtype)  # 6 rows
        # with a bias: F.linear (it adds the bias before its one rounding); float32: F.linear (BLAS)
        assert_same_bits(layer(x), plain(x))
        unbiased = Linear(40, 24, bias=False).to(dtype)
        with torch.no_grad():
            unbiased.weight.copy_(layer.weight)
        want = cpu_linear(x.reshape(6, 40), layer.weight).view(2, 3, 24)
        if dtype == torch.float32:
            want = F.linear(x, layer.weight)
        assert_same_bits(unbiased(x), want, "no bias: the kernel in bfloat16")
        big = torch.randn(GROUPED_GEMM_MAX_TOKENS + 1, 40).to(dtype)
        assert_same_bits(layer(big), plain(big), "past the limit: F.linear")
        if dtype == torch.bfloat16:  # (BLAS gives a lone row other bits than the same row among six)
            assert_same_bits(unbiased(x[0, 0]), want[0, 0], "one row without a batch dim")
    with torch.no_grad():
        half = Linear(40, 24).half()
        assert torch.equal(half(x.half()), F.linear(x.half(), half.weight, half.bias))  # float16: F.linear
    y = layer(x)  # autograd on: F.linear, which records a gradient
    assert y.requires_grad and torch.equal(y.detach(), plain(x).detach())
    assert linear(x, layer.weight.detach()).grad_fn is None


# -- the MoE block --------------------------------------------------------------------------------------------


def test_moe_cpu_steps_compute_experts_through_the_kernel(checkpoint_factory, monkeypatch):
    from moeserve import LLM, SamplingParams

    calls = []
    run = cpu_gemm._linear
    monkeypatch.setattr(cpu_gemm, "_linear", lambda x, w: calls.append(x.shape[0]) or run(x, w))
    directory, _ = checkpoint_factory("qwen3_moe")
    llm = LLM(directory, device="cpu", progress=False)
    llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert calls and set(calls) <= set(range(1, 5))  # every expert product: the prefill's few rows, then 1 per step
