"""Blob format and the API's errors: self-describing bytes, checksums, and one clear sentence per mistake."""

from __future__ import annotations

import struct

import pytest
import torch

from moeserve.codecs import Blob, CodecError, decode, decode_into, encode, names
from moeserve.errors import MoeServeError

ALL = ("szp", "sz3", "zfp", "raw", "int8", "int4", "mxfp4")
BOUND = {"szp": 1e-3, "sz3": 1e-3, "zfp": 1e-3}


def weights(shape=(64, 48), dtype=torch.bfloat16, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


def assert_one_sentence(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert isinstance(exc.value, MoeServeError)
    assert "\n" not in message and message.endswith("."), message
    for fragment in fragments:
        assert fragment in message, message


def test_registry_lists_every_codec():
    assert sorted(ALL) == names()


@pytest.mark.parametrize("codec", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_blob_is_self_describing(codec, dtype):
    x = weights((3, 5, 70), dtype)
    blob = encode(x, codec=codec, error_bound=BOUND.get(codec))
    data = bytes(blob)
    assert blob.nbytes == len(data)
    assert blob.bits_per_value == pytest.approx(8 * len(data) / x.numel())
    back = Blob.from_bytes(data)
    assert (back.codec, back.dtype, back.shape, back.mode) == (codec, dtype, (3, 5, 70), blob.mode)
    assert (back.error_bound, back.abs_bound) == (blob.error_bound, blob.abs_bound)
    y = decode(back)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, decode(blob))


@pytest.mark.parametrize("codec", ALL)
def test_empty_and_scalar_tensors(codec):
    for mode in ("abs", "rel", "mean_abs"):
        empty = Blob.from_bytes(bytes(encode(torch.empty(0, 7), codec=codec, mode=mode, error_bound=BOUND.get(codec))))
        assert decode(empty).shape == (0, 7)
    scalar = Blob.from_bytes(bytes(encode(torch.tensor(0.25), codec=codec, error_bound=BOUND.get(codec))))
    y = decode(scalar)
    assert y.shape == () and abs(y.item() - 0.25) <= 1e-3


@pytest.mark.parametrize("cut", [1, 7, 100])
def test_truncated_blob_is_refused(cut):
    data = bytes(encode(weights(), error_bound=1e-3))
    with pytest.raises(CodecError) as exc:
        Blob.from_bytes(data[:-cut])
    assert_one_sentence(exc, "truncated")


@pytest.mark.parametrize("codec", ALL)
def test_any_flipped_byte_is_caught_by_the_checksum(codec):
    data = bytearray(bytes(encode(weights(), codec=codec, error_bound=BOUND.get(codec))))
    for at in (len(data) // 2, len(data) - 1, 40):  # payload middle, payload end, header bound field
        corrupt = bytearray(data)
        corrupt[at] ^= 0x10
        with pytest.raises(CodecError) as exc:
            Blob.from_bytes(bytes(corrupt))
        assert_one_sentence(exc, "checksum")


def test_foreign_bytes_and_other_versions_are_refused():
    with pytest.raises(CodecError) as exc:
        Blob.from_bytes(b"PK\x03\x04 not a blob at all, just bytes")
    assert_one_sentence(exc, "not a moeserve codec blob")
    data = bytearray(bytes(encode(weights(), error_bound=1e-3)))
    struct.pack_into("<H", data, 4, 99)
    with pytest.raises(CodecError) as exc:
        Blob.from_bytes(bytes(data))
    assert_one_sentence(exc, "version 99")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("codec", ALL)
def test_nan_or_inf_input_is_refused(codec, bad):
    x = weights(dtype=torch.float32)
    x[3, 4] = bad
    with pytest.raises(CodecError) as exc:
        encode(x, codec=codec, error_bound=BOUND.get(codec))
    assert_one_sentence(exc, "NaN or Inf")


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(codec="lz4"), "unknown codec 'lz4'"),
        (dict(codec="szp"), "needs an error bound"),
        (dict(codec="int8", error_bound=1e-3), "has no error bound"),
        (dict(codec="szp", error_bound=0.0), "above 0"),
        (dict(codec="szp", error_bound=-1e-3), "above 0"),
        (dict(codec="szp", error_bound=float("nan")), "above 0"),
        (dict(codec="szp", error_bound="1e-3"), "must be a number"),
        (dict(codec="szp", error_bound=1e-3, mode="psnr"), "unknown error-bound mode 'psnr'"),
    ],
)
def test_bad_arguments_get_one_sentence(kwargs, fragment):
    with pytest.raises(CodecError) as exc:
        encode(weights(), **kwargs)
    assert_one_sentence(exc, fragment)


def test_non_float_tensors_are_refused():
    with pytest.raises(CodecError) as exc:
        encode(torch.arange(10), error_bound=1e-3)
    assert_one_sentence(exc, "torch.int64")


def test_decode_into_checks_its_destination():
    blob = encode(weights(), error_bound=1e-3)
    for out, fragment in (
        (torch.empty(48, 64), "of shape (64, 48)"),
        (torch.empty(64, 48, dtype=torch.int32), "torch.int32"),
    ):
        with pytest.raises(CodecError) as exc:
            decode_into(blob, out)
        assert_one_sentence(exc, fragment)
    with pytest.raises(CodecError) as exc:
        decode_into(blob, torch.empty(48, 64).t())
    assert_one_sentence(exc, "contiguous")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without CUDA")
def test_decode_to_cuda_without_a_gpu_says_so():
    with pytest.raises(CodecError) as exc:
        decode(encode(weights(), error_bound=1e-3), device="cuda")
    assert_one_sentence(exc, "no CUDA device")


def test_relocated_payload_must_be_whole():
    blob = encode(weights(), error_bound=1e-3)
    moved = blob.with_payload(torch.from_numpy(blob.payload_numpy().copy()))
    assert torch.equal(decode(moved), decode(blob))
    with pytest.raises(CodecError) as exc:
        blob.with_payload(torch.zeros(3, dtype=torch.uint8))
    assert_one_sentence(exc, "copy it whole")


def test_non_contiguous_input_is_encoded_as_its_values():
    x = weights((48, 64), torch.float32).t()
    assert torch.equal(decode(encode(x, codec="raw")), x)
