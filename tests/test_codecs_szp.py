"""szp specifics: the C++ codec against a decoder written from docs/szp-format.md, the block rules
(zero blocks, half-step and raw blocks), output dtypes, conversions, malformed payloads, and ratio."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from moeserve.codecs import Blob, CodecError, decode, decode_into, encode
from moeserve.codecs.szp_cpu import cpu_module, grid_step

STORED = (torch.float32, torch.float16, torch.bfloat16)


def spec_decode(payload: np.ndarray) -> torch.Tensor:
    """A slow decoder that follows docs/szp-format.md line by line. Returns values in the stored dtype."""
    buf = payload.tobytes()
    magic, block, chunk, n, step, code, data_bytes = struct.unpack_from("<IHHQfB3xQ", buf)
    assert (magic, block, chunk) == (0x31505A53, 32, 256)
    dtype, size = STORED[code], (4, 2, 2)[code]
    n_blocks, n_chunks = -(-n // 32), -(-n // 8192)
    table = np.frombuffer(buf, "<u8", n_chunks + 1, 32)
    rates = np.frombuffer(buf, np.uint8, n_blocks, 32 + 8 * (n_chunks + 1)).astype(int)
    data = 32 + 8 * (n_chunks + 1) + 16 * -(-n_blocks // 16)
    assert data + int(table[-1]) == len(buf) == data + data_bytes
    values = []
    for c in range(n_chunks):
        blocks = range(256 * c, min(n_blocks, 256 * c + 256))
        pos = data + int(table[c])
        sign_at = 8 * (pos + sum(32 * size if rates[b] == 255 else 4 * (rates[b] & 31) for b in blocks))
        for b in blocks:
            rate = int(rates[b])
            if rate == 255:
                raw = np.frombuffer(buf, np.int32 if size == 4 else np.int16, 32, pos)
                values.append(torch.from_numpy(raw.copy()).view(dtype).float())
                pos += 32 * size
                continue
            planes = np.frombuffer(buf, "<u4", rate & 31, pos).astype(np.int64)
            pos += 4 * (rate & 31)
            q = np.zeros(32, np.int64)
            for p, word in enumerate(planes):
                q |= ((word >> np.arange(32)) & 1) << p
            for i in np.nonzero(q)[0]:
                if (buf[sign_at // 8] >> (sign_at % 8)) & 1:
                    q[i] = -q[i]
                sign_at += 1
            s = np.float32(step) * np.float32(0.5 if rate & 32 else 1.0)
            values.append(torch.from_numpy(q.astype(np.float32) * s).to(dtype).float())
    return torch.cat(values)[:n].to(dtype) if values else torch.empty(0, dtype=dtype)


def outlier_weights(n, dtype, seed=0, sigma=0.02):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * sigma
    outliers = torch.rand(n, generator=g) < 0.002
    x[outliers] = torch.randn(int(outliers.sum()), generator=g) * sigma * 25
    return x.to(dtype)


@pytest.mark.parametrize("dtype", STORED)
@pytest.mark.parametrize("n,eb", [(20000, 1e-3), (8192 + 31, 3e-5), (500, 1e-9), (70, 1.0)])
def test_cpp_decoder_matches_the_written_spec(dtype, n, eb):
    x = outlier_weights(n, dtype)
    blob = encode(x, codec="szp", error_bound=eb)
    assert torch.equal(decode(blob), spec_decode(blob.payload_numpy()))


def test_every_plane_count_decodes_exactly():
    # Block k holds integers up to 2^k on a step-1 grid, so it needs k + 1 planes: this walks the decoder's
    # table-lookup path (up to 16 planes) and its wide path (17 and more) across their boundary.
    g = torch.Generator().manual_seed(1)
    blocks = [torch.randint(-(2**k), 2**k + 1, (32,), generator=g) for k in range(24)]
    for block, k in zip(blocks, range(24)):
        block[0] = 2**k  # the block's largest magnitude sets its plane count
    x = torch.cat(blocks).float()
    blob = encode(x, codec="szp", mode="abs", error_bound=0.5)
    assert set(range(1, 25)) <= {int(r) & 31 for r in rates_of(blob)}
    assert torch.equal(decode(blob), x)
    assert torch.equal(decode(blob), spec_decode(blob.payload_numpy()))


def rates_of(blob: Blob) -> np.ndarray:
    layout = cpu_module().layout(blob.numel)
    return blob.payload_numpy()[layout["rates_off"] : layout["rates_off"] + layout["blocks"]]


def test_an_all_zero_block_costs_one_byte():
    x = torch.zeros(32 * 300)
    x[32 * 7 + 3] = 0.5  # one coded block among 299 zero blocks
    blob = encode(x, codec="szp", error_bound=1e-3)
    rates = rates_of(blob)
    assert (rates == 0).sum() == 299
    _, _, _, data_bytes = cpu_module().read_header(blob.payload_numpy())
    assert data_bytes == 4 * rates[7] + 4  # the one block's planes and one word of sign stream


def test_bf16_outliers_use_the_half_step_grid_not_raw_blocks():
    x = outlier_weights(64 * 1024, torch.bfloat16)
    blob = encode(x, codec="szp", mode="mean_abs", error_bound=0.1)
    rates = rates_of(blob)
    assert np.any(rates & 32) and not np.any(rates == 255)


def test_values_beyond_the_grid_range_go_raw():
    x = torch.tensor([1e30, -3e29] + [0.01] * 62)
    blob = encode(x, codec="szp", error_bound=1e-6)
    assert rates_of(blob)[0] == 255 and rates_of(blob)[1] != 255  # only the block holding 1e30 is raw
    assert (decode(blob).double() - x.double()).abs().max() <= 1e-6


@pytest.mark.parametrize("stored", STORED)
@pytest.mark.parametrize("out", STORED)
def test_decode_into_any_compute_dtype(stored, out):
    x = outlier_weights(3000, stored).reshape(30, 100)
    blob = encode(x, codec="szp", error_bound=2e-3)
    y = decode_into(blob, torch.empty(30, 100, dtype=out))
    assert torch.equal(y, decode(blob).to(out))  # the stored-dtype values, cast once


def test_conversions_match_torch_for_every_half_precision_value():
    # A tiny bound stores raw blocks, so decoding them exercises the codec's own dtype conversions.
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        x = every.view(dtype)
        x = x[torch.isfinite(x)]
        blob = encode(x, codec="szp", error_bound=1e-45)
        for out in STORED:
            assert torch.equal(decode_into(blob, torch.empty(x.shape, dtype=out)), x.to(out)), (dtype, out)


def test_float32_to_half_rounding_matches_torch():
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[torch.isfinite(x)]
    x = torch.cat([x, torch.tensor([65519.996, 65520.0, 2.0**-25, 2.0**-24 * 1.5, -2.0**-25 * 1.0001])])
    blob = encode(x, codec="szp", error_bound=1e-45)
    for out in (torch.float16, torch.bfloat16):
        assert torch.equal(decode_into(blob, torch.empty(x.shape, dtype=out)), x.to(out)), out


def test_encoding_is_deterministic():
    x = outlier_weights(100_000, torch.bfloat16)
    assert bytes(encode(x, codec="szp", error_bound=1e-3)) == bytes(encode(x, codec="szp", error_bound=1e-3))


def test_grid_step_is_the_largest_float32_within_twice_the_bound():
    for eb in (1e-3, 0.1, 1 / 3, 1e-30, 1e30):
        step = grid_step(eb)
        assert step <= 2 * eb and float(np.nextafter(np.float32(step), np.float32(np.inf))) > 2 * eb
    assert grid_step(0.0) == grid_step(1e-300) == float(np.finfo(np.float32).tiny)
    assert grid_step(1e300) == float(np.finfo(np.float32).max)


def test_a_malformed_payload_behind_a_valid_checksum_is_refused():
    blob = encode(outlier_weights(5000, torch.float32), codec="szp", error_bound=1e-3)
    for tamper in ("rate", "table"):
        payload = blob.payload_numpy().copy()
        layout = cpu_module().layout(blob.numel)
        if tamper == "rate":
            payload[layout["rates_off"] + 3] = 77
        else:
            payload[layout["table_off"] + 8] ^= 0x04
        forged = Blob.from_bytes(bytes(blob.with_payload(payload)))  # checksum recomputed over the forgery
        with pytest.raises(CodecError, match="malformed"):
            decode(forged)


def test_ratio_within_20_percent_of_sz3_on_weight_like_tensors():
    x = outlier_weights(512 * 1024, torch.float32).reshape(512, 1024)
    for alpha in (0.03, 0.1, 0.3, 0.5):
        szp = encode(x, codec="szp", mode="mean_abs", error_bound=alpha).bits_per_value
        sz3 = encode(x, codec="sz3", mode="mean_abs", error_bound=alpha).bits_per_value
        assert szp <= 1.2 * sz3, (alpha, szp, sz3)
    assert math.isfinite(szp)


# -- the decode paths (scalar, avx2, avx512): one set of bytes -------------------------------------------------

DECODE_PATHS = cpu_module().supported_isas()
# each path's levels, each compiled apart: how the avx2 path places signs (table, BMI2's pdep), and what the avx512
# path adds (GFNI, AVX512-BF16)
PATH_LEVELS = {"avx2": cpu_module().avx2_levels(), "avx512": cpu_module().avx512_levels()}
# every path, at each level this CPU has: (path, level)
DECODE_CONFIGS = [(path, level) for path in DECODE_PATHS for level in PATH_LEVELS.get(path) or [None]]


def _set_level(path: str, level: str) -> None:
    getattr(cpu_module(), f"set_{path}_level")(level)


def _decode_with_each_config(blob: Blob, out_dtype: torch.dtype, fill: float) -> dict:
    """The bits every decode config writes for blob (into a tensor of `fill`), keyed by config; restores the choice."""
    module = cpu_module()
    chosen = module.isa()
    levels = {path: getattr(module, f"{path}_level")() for path, names in PATH_LEVELS.items() if names}
    decoded = {}
    try:
        for path, level in DECODE_CONFIGS:
            module.set_isa(path)
            if level is not None:
                _set_level(path, level)
            decoded[(path, level)] = _bits(decode_into(blob, torch.full(blob.shape, fill, dtype=out_dtype)))
    finally:
        module.set_isa(chosen)
        for path, level in levels.items():
            _set_level(path, level)
    return decoded


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _path_cases() -> list[Blob]:
    g = torch.Generator().manual_seed(7)
    blobs = []
    for stored in STORED:
        for eb in (1e-1, 1e-3, 1e-5):  # few planes, the usual ~9, and past 16
            blobs.append(encode(outlier_weights(5 * 8192 + 45, stored), codec="szp", mode="rel", error_bound=eb))
    wide = [torch.randint(-(2**k), 2**k + 1, (32,), generator=g) for k in range(30)]
    for block, k in zip(wide, range(30)):
        block[0] = 2**k
    blobs.append(encode(torch.cat(wide).float(), codec="szp", mode="abs", error_bound=0.5))  # 1..31 planes
    # the same plane counts with their top plane half full (above, it holds one bit): every bit of every plane counts
    dense = [torch.randint(-(2**k) + 1, 2**k, (32,), generator=g) for k in range(1, 31) for _ in range(4)]
    blobs.append(encode(torch.cat(dense).float(), codec="szp", mode="abs", error_bound=0.5))
    blobs.append(encode(torch.tensor([1e30, -3e29] + [0.01, -0.02] * 31 + [0.5] * 7), codec="szp", error_bound=1e-6))
    return blobs


@pytest.mark.exact
def test_every_decode_path_writes_the_same_bytes():
    # Each path against the portable one, for every stored and output dtype, on blocks of every plane count,
    # raw blocks, half-step blocks and a partial last block.
    module = cpu_module()
    chosen = module.isa()
    assert "scalar" in DECODE_PATHS and chosen == os.environ.get("MOESERVE_CPU_ISA", DECODE_PATHS[-1])  # the widest
    if "avx512" in DECODE_PATHS:
        assert module.avx512_level() == PATH_LEVELS["avx512"][-1]  # the widest level too
    try:
        for blob in _path_cases():
            for out_dtype in STORED:
                decoded = _decode_with_each_config(blob, out_dtype, float("nan"))
                for config, bits in decoded.items():
                    assert torch.equal(bits, decoded[("scalar", None)]), (config, blob.dtype, out_dtype)
                module.set_isa("scalar")
                assert torch.equal(decode(blob), spec_decode(blob.payload_numpy()))
    finally:
        module.set_isa(chosen)


def _has_nan_and_inf(values: torch.Tensor, through_float16: bool) -> bool:
    return bool(values.isnan().any() and values.isinf().any())


def _has_denormals(values: torch.Tensor, through_float16: bool) -> bool:
    # float16 (stored or out) flushes products this small to zero
    return through_float16 or bool(((values != 0) & (values.abs() < 1.1754944e-38)).any())


@pytest.mark.exact
@pytest.mark.parametrize("step,produces", [(np.inf, _has_nan_and_inf), (3e-39, _has_denormals)],
                         ids=["infinite", "denormal"])
def test_every_decode_path_agrees_on_a_payload_whose_step_is_extreme(step, produces):
    # No encoder writes such a step, but a damaged payload may hold one, and the header accepts any positive step.
    # Infinite: zero times infinity is NaN, and each path must round those lanes (and the infinite ones) to the
    # stored and output dtypes as the portable path does, not take its finite-step shortcut. Denormal (also the
    # half step of FLT_MIN): the products are denormal, and the AVX-512 path's bfloat16 rounding instruction, which
    # flushes denormal inputs to zero, must leave such blocks to the exact rounding.
    for stored in STORED:
        blob = encode(torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0, -7.0] * 40, dtype=stored), codec="szp", mode="abs",
                      error_bound=0.25)
        blob.payload_numpy()[16:20] = np.frombuffer(np.float32(step).tobytes(), np.uint8)
        for out_dtype in STORED:
            decoded = _decode_with_each_config(blob, out_dtype, 0.0)
            values = decoded[("scalar", None)].view(out_dtype).float()
            assert produces(values, torch.float16 in (stored, out_dtype))
            for config, bits in decoded.items():
                assert torch.equal(bits, decoded[("scalar", None)]), (config, stored, out_dtype)


def test_a_decode_path_the_cpu_lacks_or_an_unknown_one_is_refused():
    module = cpu_module()
    with pytest.raises(ValueError, match="unknown szp decode path 'sse'"):
        module.set_isa("sse")
    for missing in {"avx2", "avx512"} - set(DECODE_PATHS):
        with pytest.raises(ValueError, match="cannot run"):
            module.set_isa(missing)


def test_a_level_the_cpu_lacks_or_an_unknown_one_is_refused():
    module = cpu_module()
    for path in ("avx2", "avx512"):
        with pytest.raises(ValueError, match=f"the {path} decode path has no level 'sse'"):
            _set_level(path, "sse")
    if PATH_LEVELS["avx2"]:
        # pdep where it is fast, the table on Zen 1 and 2 (pdep in microcode there): one of the levels it has
        assert module.avx2_level() in PATH_LEVELS["avx2"] and PATH_LEVELS["avx2"][0] == "base"
    if "bmi2" not in PATH_LEVELS["avx2"]:
        with pytest.raises(ValueError, match="no level 'bmi2'"):
            _set_level("avx2", "bmi2")


def test_moeserve_cpu_isa_picks_the_decode_path_at_import():
    probe = "from moeserve.codecs.szp_cpu import cpu_module; print(cpu_module().isa())"
    run = lambda value: subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,  # noqa: E731
                                       env={**os.environ, "MOESERVE_CPU_ISA": value})
    assert run("scalar").stdout.strip() == "scalar"
    bad = run("sse")  # refused by whichever extension loads first (the GEMM's, as the package imports now)
    assert bad.returncode != 0 and "MOESERVE_CPU_ISA: unknown" in bad.stderr and "path 'sse'" in bad.stderr
