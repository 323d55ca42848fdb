"""Baselines: raw is exact; int8/int4 round to nearest within half a step of each group's scale."""

from __future__ import annotations

import pytest
import torch

from moeserve.codecs import decode, decode_into, encode
from moeserve.codecs.quant import GROUP


def weights(n=1000, dtype=torch.float32):
    return (torch.randn(n, generator=torch.Generator().manual_seed(3)) * 0.02).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_raw_is_exact(dtype):
    x = weights(dtype=dtype).reshape(10, 100)
    blob = encode(x, codec="raw")
    assert torch.equal(decode(blob), x)
    assert blob.bits_per_value == pytest.approx(8 * x.element_size(), rel=0.1)


@pytest.mark.parametrize("codec,qmax,bits", [("int8", 127, 8), ("int4", 7, 4)])
def test_group_quantization_error_is_half_a_step(codec, qmax, bits):
    x = weights(5 * GROUP + 17)  # a partial last group
    x[200] = 0.5  # one outlier widens its own group's step only
    y = decode(encode(x, codec=codec))
    groups = torch.nn.functional.pad(x, (0, -x.numel() % GROUP)).view(-1, GROUP)
    half_step = (groups.abs().amax(1) / qmax / 2).repeat_interleave(GROUP)[: x.numel()]
    assert torch.all((y - x).abs() <= half_step * (1 + 1e-6) + 1e-12)
    # codes plus one float32 scale per group (header excluded by using a large tensor)
    assert encode(weights(512 * GROUP), codec=codec).bits_per_value == pytest.approx(bits + 32 / GROUP, abs=0.01)


def test_int4_decodes_into_a_wider_dtype():
    x = weights(GROUP * 2, torch.bfloat16)
    blob = encode(x, codec="int4")
    assert torch.equal(decode_into(blob, torch.empty(x.shape)), decode(blob).float())


def test_all_zero_groups_stay_zero():
    assert torch.equal(decode(encode(torch.zeros(300), codec="int8")), torch.zeros(300))
