"""Version-dependent torch features are detected, never assumed."""

from __future__ import annotations

import types

import torch

from moeserve import devices


def test_empty_host_cache_uses_what_this_torch_has(monkeypatch):
    calls = []
    # torch 2.11 (CUDA build): no torch.accelerator.empty_host_cache, only the private binding.
    monkeypatch.setattr(torch, "accelerator", types.SimpleNamespace())
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: calls.append("private"), raising=False)
    devices.empty_host_cache()
    assert calls == ["private"]
    # a build with the public API prefers it
    monkeypatch.setattr(torch, "accelerator", types.SimpleNamespace(empty_host_cache=lambda: calls.append("public")))
    devices.empty_host_cache()
    assert calls == ["private", "public"]
    # neither: nothing to release, and no error
    monkeypatch.setattr(torch, "accelerator", types.SimpleNamespace())
    monkeypatch.delattr(torch._C, "_host_emptyCache")
    devices.empty_host_cache()
    assert calls == ["private", "public"]
