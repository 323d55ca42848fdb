// The expert cache's bookkeeping in C++ (slot_cache.h).
#include "slot_cache.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>

#include "szp_codec.h"

namespace szp {

namespace {

thread_local SlotCache* t_current = nullptr;

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

SlotCache::SlotCache(int num_slots, const std::vector<int64_t>& cycle, int64_t experts, int helpers)
    : slots_(num_slots), cycle_(cycle), experts_(experts), team_(helpers) {
    if (num_slots < 1 || cycle.empty() || experts < 1)
        throw std::invalid_argument("a slot cache needs at least one slot, one MoE layer and one expert per layer");
    for (int64_t s = num_slots - 1; s >= 0; --s) free_.push_back(s);
    const int64_t layers = int64_t(cycle.size());
    for (int64_t i = 0; i < layers; ++i) {
        if (cycle[i] < 0) throw std::invalid_argument("MoE layer ids are non-negative");
        if (cycle[i] >= int64_t(position_of_.size())) position_of_.resize(cycle[i] + 1, -1);
        if (position_of_[cycle[i]] >= 0) throw std::invalid_argument("each MoE layer appears once in the cycle");
        position_of_[cycle[i]] = i;
    }
    slot_of_.assign(layers * experts, -1);
    sources_.resize(layers * experts);
    passes_.assign(layers, 0);
    give_up_.resize(layers);
    for (int64_t i = 0; i < layers; ++i)
        for (int64_t back = 0; back < layers; ++back) give_up_[i].push_back(((i - back) % layers + layers) % layers);
}

int64_t SlotCache::position(int64_t layer) const {
    if (layer < 0 || layer >= int64_t(position_of_.size()) || position_of_[layer] < 0)
        throw std::invalid_argument("layer " + std::to_string(layer) + " is not a MoE layer of this expert cache");
    return position_of_[layer];
}

void SlotCache::set_source(int64_t layer, int64_t expert, const std::vector<const szp_u8*>& payloads,
                           const std::vector<size_t>& sizes, int64_t nbytes) {
    const int64_t pos = position(layer);
    if (expert < 0 || expert >= experts_ || payloads.size() != kMatrices || sizes.size() != kMatrices || nbytes < 0)
        throw std::invalid_argument("set_source takes an expert of the layer, its three payloads and its size");
    Source& source = sources_[pos * experts_ + expert];
    for (int m = 0; m < kMatrices; ++m) {
        source.payloads[m] = payloads[m];
        source.sizes[m] = sizes[m];
    }
    source.nbytes = nbytes;
}

void SlotCache::set_target(int slot, const std::vector<void*>& matrices, int out_dtype) {
    if (slot < 0 || slot >= num_slots() || matrices.size() != kMatrices)
        throw std::invalid_argument("set_target takes a slot of the pool and its three matrices");
    for (int m = 0; m < kMatrices; ++m) slots_[slot].matrices[m] = matrices[m];
    slots_[slot].out_dtype = out_dtype;
}

void SlotCache::touch(int slot, int64_t pos) {
    slots_[slot].used = ++clock_;
    slots_[slot].pass_used = passes_[pos];
}

void SlotCache::forget(int slot) {
    Slot& s = slots_[slot];
    slot_of_[s.key] = -1;
    s.key = -1;
    s.pins = 0;
    free_.push_back(slot);
}

int SlotCache::claim(int64_t pos) {
    if (!free_.empty()) {
        const int slot = int(free_.back());
        free_.pop_back();
        return slot;
    }
    // The least recently used unpinned slot among the stale ones, else among each layer's in give-up order.
    int best = -1;
    for (int s = 0; s < num_slots(); ++s) {
        const Slot& slot = slots_[s];
        if (slot.key >= 0 && slot.pins == 0 && slot.pass_used < passes_[slot.key / experts_] &&
            (best < 0 || slot.used < slots_[best].used))
            best = s;
    }
    for (size_t i = 0; best < 0 && i < give_up_[pos].size(); ++i) {
        const int64_t layer = give_up_[pos][i];
        for (int s = 0; s < num_slots(); ++s) {
            const Slot& slot = slots_[s];
            if (slot.key >= 0 && slot.key / experts_ == layer && slot.pins == 0 &&
                (best < 0 || slot.used < slots_[best].used))
                best = s;
        }
    }
    if (best < 0) throw std::runtime_error("no expert cache slot can be freed; the cache holds no unpinned slot");
    slot_of_[slots_[best].key] = -1;
    slots_[best].key = -1;
    return best;
}

std::vector<int64_t> SlotCache::hold(int64_t layer, const std::vector<int64_t>& experts, ThreadsRunner threads) {
    unpin();
    const int64_t pos = position(layer);
    if (int64_t(experts.size()) > num_slots())
        throw std::invalid_argument("a hold asks for " + std::to_string(experts.size()) + " experts but the cache has " +
                                    std::to_string(num_slots()) + " slots");
    for (size_t i = 0; i < experts.size(); ++i) {
        const int64_t e = experts[i];
        if (e < 0 || e >= experts_ || sources_[pos * experts_ + e].nbytes < 0)
            throw std::invalid_argument("expert " + std::to_string(e) + " of layer " + std::to_string(layer) +
                                        " is not in the compressed store");
        for (size_t j = 0; j < i; ++j)
            if (experts[j] == e) throw std::invalid_argument("a hold names each expert once");
    }
    ++passes_[pos];
    std::vector<int64_t> out(experts.size());
    std::vector<size_t>& resident = resident_;
    std::vector<size_t>& missing = missing_;
    resident.clear();
    missing.clear();
    for (size_t i = 0; i < experts.size(); ++i) {
        const int64_t slot = slot_of_[pos * experts_ + experts[i]];
        if (slot >= 0) {
            ++slots_[slot].pins;
            out[i] = slot;
            resident.push_back(i);
        } else {
            missing.push_back(i);
        }
    }
    counters_.hits += int64_t(resident.size());
    counters_.misses += int64_t(missing.size());
    // Every chunk of every miss's matrices is a task for this thread, for `threads` (torch's intra-op threads, from
    // the compiled step's op) and for the team's spinning helpers (none where no core is spare). Measured on a
    // 2-core machine (embedded model, 25% cache), handing a layer's
    // decodes to the sleeping decode-pool workers instead (one job per matrix, this thread taking whatever no
    // worker had started) ran at 0.56x of resident speed against 0.75x with every decode on this thread (one
    // compute thread; 0.66x against 0.76x at two): the wake-ups and hand-backs cost more than the decodes.
    for (size_t i : missing) {
        const int64_t key = pos * experts_ + experts[i];
        const int slot = claim(pos);
        Slot& s = slots_[slot];
        s.key = key;
        s.pins = 1;
        slot_of_[key] = slot;
        touch(slot, pos);
        out[i] = slot;
        counters_.miss_bytes += sources_[key].nbytes;
        const Source& source = sources_[key];
        for (int m = 0; m < kMatrices; ++m) {
            const szp_u64 chunks = decode_chunk_count(source.payloads[m], source.sizes[m]);
            for (szp_u64 c = 0; c < chunks; ++c)
                tasks_.push_back(ChunkTask{source.payloads[m], source.sizes[m], s.matrices[m], s.out_dtype, c, c + 1,
                                           int64_t(i)});
        }
    }
    for (size_t i : resident) touch(int(out[i]), pos);
    std::string error;
    const auto start = std::chrono::steady_clock::now();
    const int64_t failed = team_.run(tasks_, error, threads);
    tasks_.clear();
    const double seconds = seconds_since(start);
    counters_.decode_seconds += seconds;
    counters_.wait_seconds += seconds;
    for (size_t i : missing) touch(int(out[i]), pos);
    if (failed >= 0) {
        // Nothing of this hold stays pinned, and the expert that failed is not cached.
        for (size_t i = 0; i < experts.size(); ++i) --slots_[out[i]].pins;
        forget(int(out[failed]));
        throw FormatError("the compressed expert " + std::to_string(experts[failed]) + " of layer " +
                          std::to_string(layer) + " is malformed (" + error + "); re-encode the store");
    }
    for (int64_t slot : out) held_.push_back(int(slot));
    return out;
}

void SlotCache::unpin() {
    for (int slot : held_) --slots_[slot].pins;
    held_.clear();
}

void SlotCache::release() {
    unpin();
    if (t_current == this) t_current = nullptr;
}

void SlotCache::begin_step(int64_t tokens) {
    step_tokens_ = tokens;
    t_current = this;
}

SlotCache* SlotCache::current() { return t_current; }

SlotCache::Counters SlotCache::take_counters() {
    Counters taken = counters_;
    counters_ = Counters();
    return taken;
}

std::vector<std::vector<int64_t>> SlotCache::entries() const {
    std::vector<std::vector<int64_t>> out;
    for (int s = 0; s < num_slots(); ++s)
        if (slots_[s].key >= 0) out.push_back({cycle_[slots_[s].key / experts_], slots_[s].key % experts_, s});
    return out;
}

int SlotCache::pinned() const {
    int n = 0;
    for (const Slot& s : slots_) n += s.pins > 0;
    return n;
}

int held_slots_entry(const int64_t* ids, int64_t rows, int64_t k, int64_t layer, ThreadsRunner threads, int64_t* out,
                     char* error, int64_t error_size) {
    try {
        SlotCache* cache = SlotCache::current();
        if (cache == nullptr)
            throw std::logic_error("held_expert_slots ran outside a step of an offloaded model (no begin_step)");
        const int64_t tokens = std::min(cache->step_tokens(), rows);
        thread_local std::vector<int64_t> wanted;  // kept for its capacity: one call per MoE layer of every step
        wanted.assign(ids, ids + tokens * k);
        std::sort(wanted.begin(), wanted.end());
        wanted.erase(std::unique(wanted.begin(), wanted.end()), wanted.end());
        const std::vector<int64_t> slots = cache->hold(layer, wanted, threads);
        for (int64_t p = 0; p < tokens * k; ++p)
            out[p] = slots[std::lower_bound(wanted.begin(), wanted.end(), ids[p]) - wanted.begin()];
        const int64_t padding = slots.empty() ? 0 : slots[0];
        for (int64_t p = tokens * k; p < rows * k; ++p) out[p] = padding;
        return 0;
    } catch (const std::exception& e) {
        std::strncpy(error, e.what(), size_t(error_size) - 1);
        error[error_size - 1] = '\0';
        return 1;
    }
}

}  // namespace szp
