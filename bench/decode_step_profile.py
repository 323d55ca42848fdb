"""What bench/decode_step.py counts besides time: the copy bandwidth, kernel launches and host syncs.

In:  the compute device; a function that runs some decode steps.
Out: the device's copy bandwidth (bytes/s), and per step: kernel launches (CUDA kernels on a GPU; on a
     CPU, the ATen ops the step calls, not those they call in turn: each is one dispatch from the host,
     the CPU's analogue of a launch) and, on a GPU, host syncs and device→host copies, all counted by
     torch.profiler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# CUDA runtime calls that block the host until the device catches up. A device→host copy into pageable
# memory (`.tolist()`, `.item()`) shows as cudaMemcpyAsync followed by cudaStreamSynchronize.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
CPU_SYNCS_NA = "n/a: on a CPU the step runs on the host itself, so there is no device for it to wait on"


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes/s a large copy moves on `device`, reads plus writes (2 x nbytes per copy), the best of
    `repeats`: device-to-device on a GPU (CUDA events), a host memcpy on a CPU. A decode step reads its
    weights and KV cache once, so this is the rate its bytes can at best move at."""
    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    target = torch.zeros(nbytes, dtype=torch.uint8, device=device)  # both touched: no page faults timed
    target.copy_(source)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
        else:
            start_s = time.perf_counter()
            target.copy_(source)
            seconds = time.perf_counter() - start_s
        best = min(best, seconds)
    del source, target
    return 2 * nbytes / best


@dataclass
class StepCounts:
    launches_per_step: float
    host_syncs_per_step: float | None  # None on a CPU (see CPU_SYNCS_NA)
    device_to_host_copies_per_step: float | None


def count_per_step(run_steps, steps: int, device: torch.device) -> StepCounts:
    """Profile `run_steps()` (which runs `steps` decode steps) and divide its counts by `steps`."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        run_steps()
        if cuda:
            torch.cuda.synchronize(device)  # so every kernel of the steps is recorded; not counted below
    events = prof.events()
    if not cuda:
        return StepCounts(sum(1 for e in events if _is_top_level_op(e)) / steps, None, None)
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]
    host_calls = [e.name for e in events if e.device_type == DeviceType.CPU]
    own = 1 if "cudaDeviceSynchronize" in host_calls else 0  # the synchronize after the steps
    syncs = sum(1 for name in host_calls if name.split("_")[0] in SYNC_CALLS) - own  # cudaMemcpy_v2, ..._ptsz
    to_host = sum(1 for e in events if e.device_type == DeviceType.CUDA and "DtoH" in e.name)
    return StepCounts(len(kernels) / steps, syncs / steps, to_host / steps)


def _is_top_level_op(event) -> bool:
    """An ATen op called by the step itself, not by another ATen op."""
    if not event.name.startswith("aten::"):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True
