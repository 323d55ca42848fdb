"""The expert cache's bookkeeping in C++ (csrc/slot_cache.h, moeserve/offload/native_slots.py): where it is used,
the same hits, misses, slots and values as the provider's Python on the same requests, and a malformed payload
refused without a pinned or half-filled slot left behind."""

from __future__ import annotations

import random

import pytest
import torch
from random_store import random_store

from moeserve.codecs import CodecError, decode
from moeserve.codecs.szp_cpu import cpu_module
from moeserve.offload.cache import ExpertCache, SlotPool
from moeserve.offload import native_slots
from moeserve.offload.filler import CpuSlotFiller
from moeserve.offload.provider import OffloadedExpertProvider
from moeserve.offload.stats import OffloadStats

LAYERS, EXPERTS, TOP_K, D, I = 5, 8, 2, 16, 8
SZP = {"default": {"codec": "szp", "mode": "rel", "error_bound": 1e-2}}

pytestmark = pytest.mark.skipif(not hasattr(cpu_module(), "SlotCache"), reason="the szp extension is not built")


@pytest.fixture(scope="module")
def store():
    return random_store(LAYERS, EXPERTS, D, I, SZP)


@pytest.fixture(params=[0, 1], ids=["alone", "one-helper"])
def helpers(request, monkeypatch):
    """Decode helpers the C++ cache gets: as many as cores beyond torch's threads (native_slots.py), here faked."""
    monkeypatch.setattr(native_slots, "usable_cores", lambda: torch.get_num_threads() + request.param)
    return request.param


def _provider(store, slots: int, native: bool = True, eviction: str = "lfu", storage_dtype: torch.dtype | None = None,
              **options) -> OffloadedExpertProvider:
    pool = SlotPool(slots, D, I, torch.float32, torch.device("cpu"), storage_dtype)
    stats = OffloadStats()
    filler = CpuSlotFiller(pool, stats, workers=1)
    return OffloadedExpertProvider(store, pool, ExpertCache(slots, eviction), filler, stats, TOP_K, native=native,
                                   **options)


def test_the_cpu_default_configuration_runs_in_cpp_and_the_others_in_python(store):
    assert _provider(store, 10).slots_in_cpp
    assert _provider(store, 10, prefetch_depth=0).slots_in_cpp  # no guesses either way
    assert not _provider(store, 10, native=False).slots_in_cpp
    assert _provider(store, 10, eviction="lru").slots_in_cpp
    assert _provider(store, 10, prefetch_depth=1).slots_in_cpp  # guesses for the next layer too
    assert not _provider(store, 10, prefetch_depth=2).slots_in_cpp  # deeper ones are the Python provider's
    assert not _provider(store, EXPERTS - 1).slots_in_cpp  # a layer's experts must fit at once
    raw = random_store(2, EXPERTS, D, I, {"default": {"codec": "raw"}})
    assert not _provider(raw, 10).slots_in_cpp


def test_the_cpp_cache_guesses_the_next_layer_only_when_told_to(store, helpers):
    assert _provider(store, 10).prediction_depth == 0  # guesses cost compute on a CPU (provider.prediction_depth)
    assert _provider(store, 10, prefetch_depth=1).prediction_depth == 1  # forced
    assert _provider(store, 10, prefetch_depth=0).prediction_depth == 0
    assert _provider(store, 10, prefetch=False).prediction_depth == 0
    assert _provider(store, LAYERS * EXPERTS).prediction_depth == 0  # every expert fits: nothing to guess


def _requests(seed: int, steps: int) -> list[tuple[str, int, list[int], list[tuple[int, list[int]]]]]:
    """Decode-like steps (every MoE layer in turn, 1 to 4 distinct experts each, sometimes a whole layer as a
    prefill asks), each a hold (compiled step) or a fetch (eager step), with the guesses the model hands over
    first: mostly for the next layer (half of them right, the rest partly or wholly wrong), now and then for the
    one after too, none from the last layer."""
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        kind = rng.choice(["hold", "fetch"])
        width = rng.choice([1, 2, 2, 2, 3, 4, EXPERTS])
        wanted = [sorted(rng.sample(range(EXPERTS), width)) for _ in range(LAYERS)]
        for layer in range(LAYERS):
            guesses = []
            for ahead in (1, 2):
                if layer + ahead < LAYERS and rng.random() < (0.8 if ahead == 1 else 0.2):
                    right = wanted[layer + ahead] if rng.random() < 0.5 else []
                    guesses.append((layer + ahead, sorted(set(right + rng.sample(range(EXPERTS), TOP_K)))[:4]))
            out.append((kind, layer, wanted[layer], guesses))
    return out


@pytest.mark.parametrize("eviction", ["lfu", "lru"])
@pytest.mark.parametrize("slots", [EXPERTS, 10, 13, 24, LAYERS * EXPERTS])
def test_cpp_and_python_give_the_same_slots_hits_misses_and_values(store, slots, eviction, helpers):
    _compare_cpp_and_python(store, slots, eviction=eviction)


@pytest.mark.parametrize("slots", [10, 13])
def test_cpp_and_python_give_the_same_bfloat16_slots(slots, helpers):
    # bfloat16-stored experts under float32 compute live in bfloat16 slots (offload/cache.py slot_dtype): the C++
    # cache's decodes write them as the Python provider's do
    store = random_store(LAYERS, EXPERTS, D, I, SZP, dtype=torch.bfloat16)
    _compare_cpp_and_python(store, slots, torch.bfloat16)


def _compare_cpp_and_python(store, slots: int, storage_dtype: torch.dtype | None = None, eviction: str = "lfu") -> None:
    native = _provider(store, slots, eviction=eviction, storage_dtype=storage_dtype)
    python = _provider(store, slots, native=False, eviction=eviction, storage_dtype=storage_dtype)
    assert native.pool.memory.dtype == (storage_dtype or torch.float32)
    assert native.slots_in_cpp and not python.slots_in_cpp
    for step, (kind, layer, experts, guesses) in enumerate(_requests(slots, 40)):
        results = []
        for provider in (native, python):
            for guessed_layer, guessed in guesses:
                provider.prefetch(guessed_layer, guessed)
            if kind == "hold":
                provider.begin_step(1)
                held = provider.hold(layer, experts)
                values = [provider.pool.memory[slot].clone() for slot in held]
                provider.release()
            else:
                got = list(provider.fetch(layer, experts))
                assert sorted(expert for expert, _ in got) == experts
                held = [provider.cached_experts()[(layer, expert)] for expert in experts]
                values = [provider.pool.memory[slot].clone() for slot in held]
            results.append((held, values))
            assert provider.pinned_slots() == 0
        # The C++ cache waits for its guesses at its next hold, before it claims a slot; so does the reference
        # here (the Python provider takes no slot a decode is still filling).
        python._wait_for_fills()
        (native_slots, native_values), (python_slots, python_values) = results
        assert native_slots == python_slots, f"step {step}: {kind} of layer {layer} {experts}"
        assert all(torch.equal(a, b) for a, b in zip(native_values, python_values))
        assert native.cached_experts() == python.cached_experts()
    native._take_native_counters()  # the guesses issued since the last release
    names = ("hits", "misses", "miss_bytes", "bytes_transferred", "prefetches_issued", "prefetches_used",
             "prefetch_bytes", "prefetch_used_bytes", "prefetch_bytes_wasted", "prefetches_issued_at",
             "prefetches_used_at")
    for name in names:
        assert getattr(native.stats, name) == getattr(python.stats, name), name
    assert native.stats.misses > 0 and native.stats.decode_seconds > 0
    if slots < LAYERS * EXPERTS:
        assert native.stats.prefetches_used > 0 and native.stats.prefetch_bytes_wasted > 0


def test_a_malformed_payload_is_refused_and_nothing_stays_pinned_or_cached(helpers):
    store = random_store(2, EXPERTS, D, I, SZP)
    payload = store.experts[(1, 3)].blobs[2].payload_numpy()
    payload[cpu_module().layout(store.experts[(1, 3)].blobs[2].numel)["rates_off"]] = 77  # an invalid rate byte
    provider = _provider(store, 10)
    provider.begin_step(1)
    assert len(provider.hold(0, [0, 1])) == 2
    with pytest.raises(CodecError, match="expert 3 of layer 1 is malformed"):
        provider.hold(1, [2, 3])
    provider.release()
    assert provider.pinned_slots() == 0
    assert (1, 3) not in provider.cached_experts() and (1, 2) in provider.cached_experts()
    with pytest.raises(CodecError, match="malformed"):
        list(provider.fetch(1, [3]))  # asked again, it is decoded again, and refused again
    assert provider.hold(1, [2, 4]) and provider.pinned_slots() == 2
    provider.release()


def test_every_malformed_miss_and_guess_is_forgotten_and_refused_when_asked_for(helpers):
    store = random_store(3, EXPERTS, D, I, SZP)
    for key in ((1, 3), (1, 5), (2, 6)):
        blob = store.experts[key].blobs[0]
        blob.payload_numpy()[cpu_module().layout(blob.numel)["rates_off"]] = 77  # an invalid rate byte
    provider = _provider(store, 10, prefetch_depth=1)
    provider.begin_step(1)
    with pytest.raises(CodecError, match="of layer 1 is malformed"):
        provider.hold(1, [2, 3, 5])  # two malformed misses in one hold: neither stays cached
    assert provider.pinned_slots() == 0
    assert {(1, 3), (1, 5)}.isdisjoint(provider.cached_experts()) and (1, 2) in provider.cached_experts()
    provider.prefetch(2, [0, 6])  # a malformed guess: decoded beside the step, then dropped
    provider.hold(1, [2])
    assert (2, 6) in provider.cached_experts()  # its slot is claimed, its decode not yet finished
    held = provider.hold(2, [0])  # waits for the guesses first
    assert (2, 6) not in provider.cached_experts() and provider.cached_experts()[(2, 0)] == held[0]
    with pytest.raises(CodecError, match="expert 6 of layer 2 is malformed"):
        provider.hold(2, [0, 6])
    provider.release()
    assert provider.pinned_slots() == 0
    assert provider.stats.prefetches_issued == 2 and provider.stats.prefetches_used == 1


def test_a_hold_outside_a_step_or_of_an_unknown_expert_says_so(store):
    provider = _provider(store, 10)
    with pytest.raises(ValueError, match="expert 8 of layer 0 is not in the compressed store"):
        provider.hold(0, [EXPERTS])
    with pytest.raises(ValueError, match="layer 7 is not a MoE layer"):
        provider.hold(7, [0])
    ids = torch.zeros(1, TOP_K, dtype=torch.long)
    from moeserve import native_ops
    from moeserve.codecs.szp_cpu import held_slots_address
    from moeserve.layers import cpu_attention, cpu_gemm

    if not native_ops.load(cpu_gemm.entry_address(), cpu_attention.entry_address(), held_slots_address(), progress=False):
        pytest.skip(f"the C++ ops did not build: {native_ops._state.get('failure')}")
    with pytest.raises(ValueError, match="outside a step"):
        torch.ops.moeserve_native.held_expert_slots(ids, 0, [], [])
    provider.begin_step(1)
    ids = torch.tensor([[3, 1], [0, 0]])  # one real row, one padding row
    slots = torch.ops.moeserve_native.held_expert_slots(ids, 0, [], [])
    cached = provider.cached_experts()
    assert slots.tolist() == [[cached[(0, 3)], cached[(0, 1)]], [cached[(0, 1)]] * 2]
    assert provider.pinned_slots() == 2
    provider.release()
    with pytest.raises(ValueError, match="outside a step"):  # release ends the step
        torch.ops.moeserve_native.held_expert_slots(ids, 0, [], [])
    # the op hands its predictions over first: layer 1's guess (its real row only) is there when layer 1 asks
    provider.begin_step(1)
    guess = torch.tensor([[5, 2], [7, 7]])
    torch.ops.moeserve_native.held_expert_slots(ids, 0, [guess], [1])
    slots = torch.ops.moeserve_native.held_expert_slots(torch.tensor([[2, 5], [0, 0]]), 1, [], [])
    provider.release()
    cached = provider.cached_experts()
    assert slots[0].tolist() == [cached[(1, 2)], cached[(1, 5)]] and (1, 7) not in cached
    assert provider.stats.prefetches_issued == provider.stats.prefetches_used == 2
    with pytest.raises(ValueError, match="each prediction as ids are"):
        torch.ops.moeserve_native.held_expert_slots(ids, 0, [guess[:1]], [1])


def test_many_chunk_experts_decode_to_the_codec_values_with_and_without_helpers(helpers):
    # [512, 64] matrices: 32768 values, 4 szp chunks each, so one miss is 12 tasks for the team
    store = random_store(3, 4, 64, 512, SZP)
    pool = SlotPool(4, 64, 512, torch.float32, torch.device("cpu"))
    provider = OffloadedExpertProvider(store, pool, ExpertCache(4), CpuSlotFiller(pool, OffloadStats(), workers=1),
                                       OffloadStats(), TOP_K)
    assert provider.slots_in_cpp
    for sweep in range(3):
        for layer in range(3):
            provider.begin_step(1)
            experts = [0, 1, 2, 3] if sweep != 1 else [layer % 4]
            for expert, slot in zip(experts, provider.hold(layer, experts)):
                weights = pool.weights(slot)
                for blob, matrix in zip(store.experts[(layer, expert)].blobs, (weights.gate, weights.up, weights.down)):
                    assert torch.equal(matrix, decode(blob).view(matrix.shape))
            provider.release()
    assert provider.stats.hits + provider.stats.misses == 27 and provider.stats.misses >= 24  # 4 slots, 3 layers


def test_a_model_guessing_through_the_cpp_cache_generates_what_it_does_without_guesses():
    from moeserve import LLM, SamplingParams

    policy = {"default": {"codec": "szp", "mode": "rel", "error_bound": 1e-3}}
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[(7 * j) % 768 for j in range(16)]]
    runs = {}
    for depth in (1, None):
        options = {"prefetch_depth": depth} if depth else {"prefetch": False}
        # eager: the compiled op's predictions are test_a_hold_outside_a_step_or_of_an_unknown_expert_says_so's
        # (and a compile per depth would cost a cold test run a minute)
        llm = LLM(None, device="cpu", policy=policy, expert_cache="25%", progress=False, prefix_caching=False,
                  enforce_eager=True, **options)
        assert llm.offload.provider.slots_in_cpp and llm.offload.provider.prediction_depth == (depth or 0)
        runs[depth] = (llm.generate(prompts, params)[0].token_ids, llm.offload.stats)
    (guessed, with_guesses), (plain, without) = runs[1], runs[None]
    assert guessed == plain  # every expert is decoded to the same values, guessed or missed
    assert with_guesses.prefetches_used > 0 and with_guesses.prefetches_issued_at.keys() == {1}
    assert with_guesses.misses < without.misses and without.prefetches_issued == 0
    assert with_guesses.hits + with_guesses.misses == without.hits + without.misses
