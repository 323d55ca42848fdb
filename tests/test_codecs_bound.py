"""The bound holds: max |decode(encode(x)) - x| <= eb for every bounded codec, measured in float64 against
the original tensor in its own dtype, over random shapes, scales, dtypes, modes and adversarial values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeserve.codecs import Blob, decode, decode_into, encode
from moeserve.codecs.szp_cpu import grid_step

BOUNDED = ("szp", "sz3", "zfp")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest magnitude each dtype can hold with room to spare (fp16 tops out at 65504).
MAX_SCALE = {torch.float32: 1e30, torch.float16: 1e4, torch.bfloat16: 1e30}
TINY = {torch.float32: 1e-40, torch.float16: 1e-7, torch.bfloat16: 1e-40}  # subnormal in each dtype


def one_ulp(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """x moved by one ulp of its own dtype (+1 / -1 on the bit pattern, away from / toward zero)."""
    bits = x.view(torch.int32 if x.element_size() == 4 else torch.int16)
    return (bits + direction.to(bits.dtype)).view(x.dtype)


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=3)))
    n = int(np.prod(shape))
    seed = draw(st.integers(0, 2**31))
    scale = 10.0 ** draw(st.floats(-6, np.log10(MAX_SCALE[dtype])))
    kind = draw(st.sampled_from(["gauss", "heavy", "grid", "special", "constant"]))
    eb = scale * 10.0 ** draw(st.floats(-5, 0.5))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale
    if kind == "heavy":  # heavy-tailed outliers, as in trained weights
        x[torch.rand(n, generator=g) < 0.05] *= 50
    elif kind == "grid":  # on szp's grid points and midways between them, then one ulp either way
        step = grid_step(eb)
        x = (torch.round(x / step) + 0.5 * torch.randint(0, 2, (n,), generator=g)) * step
    elif kind == "special":  # subnormals, +-0 and the largest magnitudes mixed in
        pick = torch.randint(0, 4, (n,), generator=g)
        x = torch.where(pick == 0, torch.full_like(x, TINY[dtype]), x)
        x = torch.where(pick == 1, torch.zeros_like(x), x)
        x = torch.where(pick == 2, torch.full_like(x, -0.0), x)
    elif kind == "constant":
        x = torch.full_like(x, float(x[0]))
    x = x.clamp(-MAX_SCALE[dtype] * 50, MAX_SCALE[dtype] * 50).to(dtype)
    if kind == "grid":
        x = one_ulp(x, torch.randint(-1, 2, (n,), generator=g))
    x = torch.nan_to_num(x, posinf=0.0, neginf=0.0).reshape(shape)
    mode = draw(st.sampled_from(["abs", "rel", "mean_abs"]))
    bound = eb if mode == "abs" else 10.0 ** draw(st.floats(-5, 0))
    return x, mode, bound


def assert_within(x: torch.Tensor, y: torch.Tensor, blob: Blob) -> None:
    assert y.dtype == x.dtype and y.shape == x.shape
    err = (y.double() - x.double()).abs().max().item()
    assert err <= blob.abs_bound, f"{blob.codec}: max error {err} > bound {blob.abs_bound}"


@pytest.mark.parametrize("codec", BOUNDED)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tensors())
def test_bound_holds(codec, case):
    x, mode, bound = case
    blob = encode(x, codec=codec, mode=mode, error_bound=bound)
    assert_within(x, decode(blob), blob)


@settings(max_examples=20, deadline=None)
@given(case=tensors())
def test_bound_holds_after_bytes_and_into_wider_dtype(case):
    x, mode, bound = case
    blob = Blob.from_bytes(bytes(encode(x, codec="szp", mode=mode, error_bound=bound)))
    wide = decode_into(blob, torch.empty(x.shape, dtype=torch.float32))
    assert_within(x.float(), wide, blob)
    assert torch.equal(wide, decode(blob).float())  # a wider output holds exactly the stored-dtype values


@pytest.mark.parametrize("codec", BOUNDED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bound_below_dtype_resolution_stores_losslessly(codec, dtype):
    x = (torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 100).to(dtype)
    blob = encode(x, codec=codec, error_bound=1e-30)
    assert torch.equal(decode(blob), x)


@pytest.mark.parametrize("codec", BOUNDED)
def test_constant_tensor_under_rel_is_exact(codec):
    x = torch.full((64, 3), 0.3, dtype=torch.bfloat16)
    blob = encode(x, codec=codec, mode="rel", error_bound=1e-2)
    assert blob.abs_bound == 0.0
    assert torch.equal(decode(blob), x)


@pytest.mark.parametrize("mode,expected", [("abs", 0.5), ("rel", 0.5 * 4.0), ("mean_abs", 0.5 * 1.5)])
def test_modes_resolve_to_an_absolute_bound(mode, expected):
    x = torch.tensor([-1.0, 3.0, 1.0, 1.0])
    blob = encode(x, codec="szp", mode=mode, error_bound=0.5)
    assert blob.abs_bound == pytest.approx(expected)
    assert blob.error_bound == 0.5 and blob.mode == mode
