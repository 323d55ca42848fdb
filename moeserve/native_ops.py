"""moeserve's CPU kernels as C++ torch ops (library `moeserve_native`), built on first use for compiled steps.

In:  csrc/torch_ops.cpp (shipped in the package as moeserve/_csrc when installed) and the installed torch.
Out: torch.ops.moeserve_native.kv_write / cpu_grouped_gemm / cpu_linear / gated_activation / cpu_paged_decode, the
     C++ twins of moeserve::kv_write (kv/cache.py), of layers/cpu_gemm.py's ops, of layers/mlp.py's and of
     layers/cpu_attention.py's: the same arguments,
     checks and kernels, so the same bits;
     and held_expert_slots, a compiled step's way into the C++ expert cache (offload/native_slots.py).

Why: a compiled CPU decode step (engine/compiled_decode.py) calls these a few times per layer from inductor's
C++ wrapper. Registered from Python, each call goes back into the interpreter (~10-15 us); on a small model
that was a fifth of a token's time. The library is compiled against the running torch, once per torch
version, CPU capability and source, into ~/.cache/moeserve/native-ops (MOESERVE_CACHE_DIR), which takes
~8 s on a 2-core machine; `load()` then only loads it. It needs what inductor's C++ wrapper needs anyway (a
C++ compiler and torch's headers) plus ninja. If building fails, `load()` says so in one line and the Python ops stay in use.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from pathlib import Path

import torch

from moeserve.paths import cache_root

# -fopenmp: at::parallel_for (held_expert_slots hands the step's idle intra-op threads its decodes) is an OpenMP
# pragma in torch's headers, a no-op without it; it binds to the OpenMP runtime torch loaded (same soname).
_CFLAGS = ["-O2", "-ffp-contract=off", "-fopenmp"]
_SOURCES = ("torch_ops.cpp", "cpu_gemm.h", "cpu_attention.h")
_lock = threading.Lock()
_state: dict[str, object] = {}  # "loaded": bool once tried; "failure": why not


def _source_dir() -> Path | None:
    here = Path(__file__).resolve()
    for candidate in (here.parent / "_csrc", here.parents[1] / "csrc"):
        if all((candidate / name).is_file() for name in _SOURCES):
            return candidate
    return None


def build_dir(sources: Path) -> Path:
    """Where the library is built: per torch version and CPU capability, and per source content."""
    root = cache_root() / "native-ops"
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((sources / name).read_bytes())
    digest.update(" ".join(_CFLAGS).encode())
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return root / f"torch-{torch.__version__}-{capability}-{digest.hexdigest()[:16]}"


def loaded() -> bool:
    """Whether the C++ ops are registered (load() succeeded in this process)."""
    return bool(_state.get("loaded"))


def load(gemm_entry: int | None, attention_entry: int | None, held_slots_entry: int | None, progress: bool = True) -> bool:
    """Build (first time) and load the C++ ops; True when they are usable. `gemm_entry`, `attention_entry`: the
    addresses of the CPU GEMM's and paged attention's entry points (layers/cpu_gemm.py and layers/cpu_attention.py
    `entry_address`; None when that extension is not built);
    `held_slots_entry`: the C++ expert cache's (codecs/szp_cpu.py `held_slots_address`). Never raises: a
    failure is one line on stderr, said once, and the Python ops stay in use."""
    with _lock:
        if "loaded" in _state:
            return bool(_state["loaded"])
        _state["loaded"] = False
        try:
            if gemm_entry is None or attention_entry is None or held_slots_entry is None:
                raise RuntimeError("the CPU GEMM or szp extension is not built")
            sources = _source_dir()
            if sources is None:
                raise RuntimeError("csrc/torch_ops.cpp is not installed with moeserve")
            directory = build_dir(sources)
            directory.mkdir(parents=True, exist_ok=True)
            if progress and not any(directory.glob("*.so")):
                print(f"moeserve: building the C++ CPU ops for compiled steps (once per torch version; in {directory})...",
                      file=sys.stderr, flush=True)
            from torch.utils.cpp_extension import load as build

            build(
                name="moeserve_native_ops",
                sources=[str(sources / "torch_ops.cpp")],
                extra_include_paths=[str(sources)],
                extra_cflags=_CFLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
                is_python_module=False,
                verbose=False,
            )
            torch.ops.moeserve_native.bind_cpu_gemm(gemm_entry)
            torch.ops.moeserve_native.bind_cpu_attention(attention_entry)
            torch.ops.moeserve_native.bind_held_slots(held_slots_entry)
            _register_fakes()
            _state["loaded"] = True
        except Exception as error:  # a missing compiler, ninja or header: the Python ops still work
            _state["failure"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            print(f"moeserve: the C++ CPU ops could not be built ({_state['failure']}); compiled steps call the "
                  f"Python ones", file=sys.stderr, flush=True)
        return bool(_state["loaded"])


def _register_fakes() -> None:
    lib = torch.library.Library("moeserve_native", "FRAGMENT")
    torch.library.register_fake("moeserve_native::kv_write", lambda k_pool, v_pool, slots, keys, values: None, lib=lib)
    torch.library.register_fake(
        "moeserve_native::cpu_grouped_gemm", lambda a, rows, slots, weights: a.new_empty(rows.shape[0], weights.shape[1]),
        lib=lib,
    )
    torch.library.register_fake(
        "moeserve_native::cpu_linear", lambda x, weight: x.new_empty(x.shape[0], weight.shape[0]), lib=lib
    )
    torch.library.register_fake("moeserve_native::held_expert_slots", lambda ids, *args: torch.empty_like(ids), lib=lib)
    torch.library.register_fake(
        "moeserve_native::gated_activation", lambda gate, up, act: gate.new_empty(gate.shape), lib=lib
    )
    torch.library.register_fake(
        "moeserve_native::cpu_paged_decode",
        lambda query, k_pool, v_pool, tables, positions, scale, window, sinks, value_dim: query.new_empty(
            query.shape[0], query.shape[1], value_dim
        ),
        lib=lib,
    )
    _state["library"] = lib  # a Library's registrations last as long as the object


def ops():
    """The op namespace a compiled step calls: moeserve_native once `load` succeeded, else moeserve's Python ops."""
    return torch.ops.moeserve_native if _state.get("loaded") else torch.ops.moeserve
