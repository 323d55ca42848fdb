"""Background CPU decoding (offload/decode_pool.py): the native szp pool and the Python fallback write exactly
what decode_into writes, urgent units run first, and errors reach the waiting caller as CodecError."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeserve.codecs import Blob, CodecError, decode, encode
from moeserve.codecs.szp_cpu import cpu_module
from moeserve.offload.decode_pool import CpuDecodePool


def _weights(seed: int, shape=(96, 64)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("codec,bound", [("szp", 1e-3), ("sz3", 1e-3), ("raw", None)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_background_decodes_equal_decode(codec, bound, out_dtype):
    pool = CpuDecodePool(threads=2)
    blobs = [encode(_weights(i).to(torch.bfloat16), codec=codec, mode="rel", error_bound=bound) for i in range(6)]
    outs = [torch.full(b.shape, float("nan"), dtype=out_dtype) for b in blobs]
    handles = [pool.submit([(blob, out)], urgent=i % 2 == 0) for i, (blob, out) in enumerate(zip(blobs, outs))]
    for handle in handles:
        handle.wait()
        assert handle.done() and handle.seconds >= 0.0
    pool.close()
    for blob, out in zip(blobs, outs):
        assert torch.equal(out, decode(blob).to(out_dtype))


def test_urgent_units_run_before_queued_ones():
    # One thread, kept busy by a first unit: everything after it queues, and urgent units must overtake.
    pool = CpuDecodePool(threads=1)
    big = encode(_weights(0, (2048, 1024)), codec="szp", error_bound=1e-4)
    small = encode(_weights(1), codec="szp", error_bound=1e-3)
    medium = encode(_weights(5, (1024, 256)), codec="szp", error_bound=1e-4)  # 40 of them: tens of ms
    busy = pool.submit([(big, torch.empty(big.shape))])
    queued = [pool.submit([(medium, torch.empty(medium.shape))]) for _ in range(40)]
    urgent = pool.submit([(small, torch.empty(small.shape))], urgent=True)
    urgent.wait()
    assert sum(handle.done() for handle in queued) < len(queued)
    busy.wait()
    pool.close()
    assert all(handle.done() for handle in queued)  # close finishes what was submitted


@pytest.mark.parametrize("spare_cores", [True, False])
def test_a_unit_no_worker_has_started_runs_on_the_waiting_thread(spare_cores):
    # The only worker is busy with a big unit: an urgent unit (or any unit) waited for runs on the waiter's
    # thread instead of queueing behind it, and runs once (a worker popping it later skips it). The big unit is
    # four 4M-value matrices (~40 ms), so that the worker still holds it when this thread, descheduled now and
    # then on a loaded machine, has decoded both small ones (with one matrix it once finished first).
    pool = CpuDecodePool(threads=1, spare_cores=spare_cores)
    big = encode(_weights(0, (4096, 1024)), codec="szp", error_bound=1e-4)
    small = encode(_weights(1), codec="szp", error_bound=1e-3)
    busy = pool.submit([(big, torch.empty(big.shape)) for _ in range(4)])
    outs = [torch.full(small.shape, float("nan")) for _ in range(2)]
    urgent = pool.submit([(small, outs[0])], urgent=True)
    queued = pool.submit([(small, outs[1])])
    for handle in (urgent, queued):
        handle.wait()
        assert handle.done() and not busy.done()
    busy.wait()
    pool.close()
    assert all(torch.equal(out, decode(small)) for out in outs)


def test_a_malformed_payload_fails_in_the_waiting_caller():
    blob = encode(_weights(2), codec="szp", error_bound=1e-3)
    payload = blob.payload_numpy().copy()
    payload[cpu_module().layout(blob.numel)["rates_off"]] = 77  # an invalid rate byte
    forged = Blob.from_bytes(bytes(blob.with_payload(payload)))
    pool = CpuDecodePool()
    handle = pool.submit([(forged, torch.empty(forged.shape))])
    with pytest.raises(CodecError, match="malformed"):
        handle.wait()
    pool.close()


def test_a_wrong_target_is_refused_before_queueing():
    blob = encode(_weights(3), codec="szp", error_bound=1e-3)
    pool = CpuDecodePool()
    with pytest.raises(CodecError, match="shape"):
        pool.submit([(blob, torch.empty(blob.shape[::-1]))])
    with pytest.raises(CodecError, match="contiguous"):
        pool.submit([(blob, torch.empty(blob.shape[::-1]).t())])
    pool.close()


def test_dropping_a_handle_early_keeps_the_buffers_alive():
    pool = CpuDecodePool(threads=1)
    blob = encode(_weights(4, (1024, 512)), codec="szp", error_bound=1e-4)
    for _ in range(8):
        pool.submit([(blob, torch.empty(blob.shape))])  # handle and output dropped at once
    out = torch.empty(blob.shape)
    pool.submit([(blob, out)]).wait()
    pool.close()
    assert torch.equal(out, decode(blob))
    assert np.isfinite(out.numpy()).all()


def test_a_failed_python_decode_reports_only_through_wait():
    # sz3 runs on the Python threads; a payload it cannot read fails there, and only wait() raises it.
    blob = encode(_weights(6), codec="sz3", mode="rel", error_bound=1e-3)
    forged = blob.with_payload(np.zeros(blob.payload_nbytes, dtype=np.uint8))
    pool = CpuDecodePool()
    handle = pool.submit([(forged, torch.empty(forged.shape))])
    with pytest.raises(Exception):  # whatever sz3 raises for zeroed bytes
        handle.wait()
    assert handle.done() and handle.seconds == 0.0
    pool.close()


def test_only_szp_offers_a_native_decoder():
    from moeserve.codecs import names
    from moeserve.codecs.registry import get

    assert {name for name in names() if get(name).native_decoder() is not None} == {"szp"}
