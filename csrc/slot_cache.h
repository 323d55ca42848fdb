// The expert cache's bookkeeping in C++, for compiled CPU decode steps over szp-compressed experts.
//
// In:  hold(layer, experts) once per MoE layer of a step: from a compiled step's C++ op
//      (torch_ops.cpp held_expert_slots, through held_slots_entry) or from Python (the provider's hold and fetch);
//      guess(layer, experts) before it, the model's prediction of a later layer's experts (router on this layer's
//      hidden states).
// Out: the slot of each expert, every one decoded and pinned until release(); counters for OffloadStats.
//
// Why: moeserve/offload/provider.py does this in Python, ~55 us per layer with every expert cached and ~80 us per
// miss on top of its decode; on a small model that was more than the step's own compute. This is the same policy,
// for the configuration the CPU serves by default (moeserve/offload/native_slots.py says which): LFU or LRU
// eviction, a pool that holds a layer's experts at once. The provider's Python is the reference it is tested against
// (tests/test_native_slots.py): same hits, misses, guesses and slots for the same requests.
//
// Policy (provider.py `_serve`, `_issue_hints` and `_start`; the eviction order of offload/cache.py): a hit is
// pinned; a miss takes a free slot, else the first unpinned expert in eviction order among those its layer did not
// use on its latest pass ("stale"), else the first unpinned expert in eviction order of the layers in give-up order
// (the miss's own layer first, then the layers that ran most recently). Once a hold has claimed its misses it issues
// the guesses it was given: each takes a slot as a miss of its layer would, never another guess's, the next layer's
// from any layer in its give-up order, a deeper one only a free or stale slot of a layer that does not run before
// it. A guess is for its layer's next pass; the guesses that pass does not ask for turn stale. Misses are decoded by
// the calling thread, torch's intra-op threads where the op lends them, and spinning helpers (decode_team.h; hold
// says why not the decode pool's workers); guesses by the helpers while the step computes, and what is left of them
// by the next hold. Used from one thread at a time (the model's).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "decode_team.h"
#include "szp_format.h"

namespace szp {

class SlotCache {
  public:
    static constexpr int kMatrices = 3;  // gate, up, down

    // Eviction order (offload/cache.py's policies of the same names): least recently used first; or least
    // frequently used first, ties least recently used, where a use adds kUse to its expert's count and every
    // kAgingPasses passes of a layer halve its experts' counts.
    enum class Eviction { kLru, kLfu };
    static constexpr int64_t kUse = 256;
    static constexpr int64_t kAgingPasses = 4;

    // cycle: the MoE layer ids in the order a step runs them; experts: per layer; helpers: decode threads beside
    // the caller's, for cores nothing else computes on (0: the caller decodes alone).
    SlotCache(int num_slots, const std::vector<int64_t>& cycle, int64_t experts, int helpers,
              Eviction eviction = Eviction::kLru);

    // Where expert (layer, expert)'s compressed matrices are (payload, bytes), and its compressed size for the counters.
    void set_source(int64_t layer, int64_t expert, const std::vector<const szp_u8*>& payloads,
                    const std::vector<size_t>& sizes, int64_t nbytes);
    // Where slot `slot`'s matrices are (gate, up, down), in dtype code out_dtype.
    void set_target(int slot, const std::vector<void*>& matrices, int out_dtype);

    // Loads `experts` (distinct) of `layer` and pins them until the next hold or release; their slots, in order.
    // Throws FormatError (with the layer and expert) if a payload is malformed; that expert is then not cached.
    // `threads`: a pool whose threads decode too (DecodeTeam::run).
    std::vector<int64_t> hold(int64_t layer, const std::vector<int64_t>& experts, ThreadsRunner threads = nullptr);
    // The experts `layer` is predicted to ask for on its next pass, loaded by the next hold of another layer (a newer
    // guess for the layer replaces this one). A malformed guessed expert is dropped; asked for, it fails as a miss.
    void guess(int64_t layer, const std::vector<int64_t>& experts);
    // Unpins the latest hold's slots and ends the step (begin_step) if this thread runs one here.
    void release();

    // The step the calling thread runs now (held_slots_entry's): set at its start, cleared at its end (release).
    void begin_step(int64_t tokens);
    static SlotCache* current();
    int64_t step_tokens() const { return step_tokens_; }

    // Counters since the last take (OffloadStats' names; decode_seconds and wait_seconds are both the wall time of
    // the decodes a hold waited for, however many threads shared them).
    struct Counters {
        int64_t hits = 0, misses = 0, miss_bytes = 0;
        int64_t prefetches_issued = 0, prefetches_used = 0, prefetch_bytes = 0, prefetch_used_bytes = 0,
                prefetch_bytes_wasted = 0;
        std::vector<int64_t> prefetches_issued_at, prefetches_used_at;  // by distance (index 0 unused)
        double decode_seconds = 0.0, wait_seconds = 0.0;
    };
    Counters take_counters();

    // What is cached: (layer, expert, slot) triples, and how many slots are pinned.
    std::vector<std::vector<int64_t>> entries() const;
    int pinned() const;
    int num_slots() const { return int(slots_.size()); }

  private:
    struct Slot {
        int64_t key = -1;  // layer position * experts + expert; -1: free
        int pins = 0;
        uint64_t used = 0;  // LRU clock of its latest use
        int64_t pass_used = 0;  // its layer's pass that last used it, or that a guess is for
        bool guessed = false;  // loaded on a guess that no hold has used yet
        bool pending = false;  // a guess its layer has not had its pass for yet (no other guess may take it)
        int64_t distance = 0;  // a guess's: MoE layers from the hold that issued it forward to its own
        void* matrices[kMatrices] = {nullptr, nullptr, nullptr};
        int out_dtype = -1;
    };
    struct Source {
        const szp_u8* payloads[kMatrices] = {nullptr, nullptr, nullptr};
        size_t sizes[kMatrices] = {0, 0, 0};
        int64_t nbytes = -1;  // -1: not set
    };

    int64_t position(int64_t layer) const;  // the layer's place in the cycle; throws for a layer not in it
    void check_expert(int64_t position, int64_t layer, int64_t expert) const;  // throws for one not in the store
    // A slot for an expert of the layer at `position`: free, else stale, else from the layers in its give-up order
    // (with `may_evict`); -1 if there is none. `guess_distance` 0: for a miss; else for a guess that far ahead, which
    // takes no pending guess's slot nor one of guessing_'s, and no stale slot of a layer that runs before its own.
    int claim(int64_t position, bool may_evict, int64_t guess_distance);
    void evict(int slot);  // frees an unpinned slot for claim
    void touch(int slot, int64_t position);  // recent: claimed or used
    void use(int slot, int64_t position);  // a hold's use of a cached expert
    bool evict_before(const Slot& a, const Slot& b) const;  // a is the better victim
    void unpin();
    void forget(int slot);
    void drop_guesses(int64_t position, const std::vector<int64_t>& keep);  // pending guesses not in keep turn stale
    void issue_guesses(int64_t position);  // the guesses given since the last hold, after `position`'s misses
    void finish_guesses(ThreadsRunner threads);  // waits for the guesses' decodes; forgets the ones that failed
    void queue_decode(int slot, int64_t owner, std::vector<ChunkTask>& tasks) const;
    int64_t distance(int64_t from, int64_t to) const;  // MoE layers from position `from` forward to `to`

    std::vector<Slot> slots_;
    std::vector<int64_t> free_;  // popped from the back: slot 0 first
    std::vector<int64_t> cycle_;
    std::vector<int64_t> position_of_;  // layer id -> position, -1 for other layers
    int64_t experts_;
    std::vector<int64_t> slot_of_;  // key -> slot, -1 when not cached
    std::vector<Source> sources_;  // per key
    std::vector<int64_t> passes_;  // per position: holds of that layer so far
    Eviction eviction_;
    std::vector<int64_t> uses_;  // per key: the LFU count (kept across evictions)
    std::vector<std::vector<int64_t>> give_up_;  // per position: positions in the order their slots are taken
    std::vector<int> held_;  // slots pinned by the latest hold
    std::vector<std::pair<int64_t, std::vector<int64_t>>> hints_;  // (position, experts) given to guess since
    std::vector<std::vector<int64_t>> pending_;  // per position: keys of its guesses not yet had a pass for
    std::vector<char> guessing_;  // per key: named by the guess being issued (no other guess takes its slot)
    std::vector<int64_t> wanted_keys_;  // the latest hold's keys (kept for capacity)
    std::vector<ChunkTask> guess_tasks_;  // the started decodes of the latest hold's guesses
    std::vector<ChunkTask> tasks_;  // the latest hold's decodes, and below its hits and misses (kept for capacity)
    std::vector<size_t> resident_, missing_;
    uint64_t clock_ = 0;
    int64_t step_tokens_ = 0;
    Counters counters_;
    DecodeTeam team_;  // last, so destroyed first: its helpers stop before what they read goes
};

// For a compiled step's C++ op: the slots [rows, k] of ids [rows, k] (only the first step_tokens rows are real;
// padding rows get the first held slot) for MoE layer `layer`, through the calling thread's current SlotCache,
// after handing it `predictions` guesses: predicted[i] [rows, k] ids for MoE layer predicted_layers[i];
// `threads` (may be null): the op's intra-op threads, which decode the misses too.
// Returns 0, or 1 with a one-sentence message in error (error_size bytes) for a caller error or a malformed payload.
int held_slots_entry(const int64_t* ids, int64_t rows, int64_t k, int64_t layer, const int64_t* const* predicted,
                     const int64_t* predicted_layers, int64_t predictions, ThreadsRunner threads, int64_t* out,
                     char* error, int64_t error_size);

}  // namespace szp
