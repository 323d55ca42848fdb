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

SlotCache::SlotCache(int num_slots, const std::vector<int64_t>& cycle, int64_t experts, int helpers,
                     Eviction eviction)
    : slots_(num_slots), cycle_(cycle), experts_(experts), eviction_(eviction), team_(helpers) {
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
    uses_.assign(layers * experts, 0);
    pending_.resize(layers);
    guessing_.assign(layers * experts, 0);
    counters_.prefetches_issued_at.assign(layers + 1, 0);
    counters_.prefetches_used_at.assign(layers + 1, 0);
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

void SlotCache::use(int slot, int64_t pos) {
    touch(slot, pos);
    Slot& s = slots_[slot];
    uses_[s.key] += kUse;
    if (s.guessed) {
        s.guessed = false;
        ++counters_.prefetches_used;
        ++counters_.prefetches_used_at[s.distance];
        counters_.prefetch_used_bytes += sources_[s.key].nbytes;
    }
}

void SlotCache::forget(int slot) {
    evict(slot);
    free_.push_back(slot);
}

void SlotCache::evict(int slot) {
    Slot& s = slots_[slot];
    if (s.pending) {
        std::vector<int64_t>& pending = pending_[s.key / experts_];
        pending.erase(std::find(pending.begin(), pending.end(), s.key));
    }
    if (s.guessed) counters_.prefetch_bytes_wasted += sources_[s.key].nbytes;
    slot_of_[s.key] = -1;
    s.key = -1;
    s.pins = 0;
    s.guessed = s.pending = false;
}

int64_t SlotCache::distance(int64_t from, int64_t to) const {
    const int64_t layers = int64_t(cycle_.size());
    return ((to - from - 1) % layers + layers) % layers + 1;
}

bool SlotCache::evict_before(const Slot& a, const Slot& b) const {
    if (eviction_ == Eviction::kLfu && uses_[a.key] != uses_[b.key]) return uses_[a.key] < uses_[b.key];
    return a.used < b.used;
}

int SlotCache::claim(int64_t pos, bool may_evict, int64_t guess_distance) {
    const bool guess = guess_distance > 0;
    if (!free_.empty()) {
        const int slot = int(free_.back());
        free_.pop_back();
        return slot;
    }
    auto takeable = [&](const Slot& slot) {
        return slot.key >= 0 && slot.pins == 0 && (!guess || (!slot.pending && !guessing_[slot.key]));
    };
    // The first takeable slot in eviction order among the stale ones, else among each layer's in give-up order.
    int best = -1;
    for (int s = 0; s < num_slots(); ++s) {
        const Slot& slot = slots_[s];
        const int64_t layer = slot.key / experts_;
        // a deeper guess leaves the stale slots of the layers that run before its own to them
        if (takeable(slot) && slot.pass_used < passes_[layer] && (!guess || distance(layer, pos) >= guess_distance) &&
            (best < 0 || evict_before(slot, slots_[best])))
            best = s;
    }
    for (size_t i = 0; may_evict && best < 0 && i < give_up_[pos].size(); ++i) {
        const int64_t layer = give_up_[pos][i];
        for (int s = 0; s < num_slots(); ++s) {
            const Slot& slot = slots_[s];
            if (takeable(slot) && slot.key / experts_ == layer && (best < 0 || evict_before(slot, slots_[best])))
                best = s;
        }
    }
    if (best >= 0) evict(best);
    return best;
}

void SlotCache::queue_decode(int slot, int64_t owner, std::vector<ChunkTask>& tasks) const {
    const Slot& s = slots_[slot];
    const Source& source = sources_[s.key];
    for (int m = 0; m < kMatrices; ++m) {
        const szp_u64 chunks = decode_chunk_count(source.payloads[m], source.sizes[m]);
        for (szp_u64 c = 0; c < chunks; ++c)
            tasks.push_back(ChunkTask{source.payloads[m], source.sizes[m], s.matrices[m], s.out_dtype, c, c + 1, owner});
    }
}

void SlotCache::check_expert(int64_t pos, int64_t layer, int64_t expert) const {
    if (expert < 0 || expert >= experts_ || sources_[pos * experts_ + expert].nbytes < 0)
        throw std::invalid_argument("expert " + std::to_string(expert) + " of layer " + std::to_string(layer) +
                                    " is not in the compressed store");
}

void SlotCache::guess(int64_t layer, const std::vector<int64_t>& experts) {
    const int64_t pos = position(layer);
    for (int64_t e : experts) check_expert(pos, layer, e);
    std::vector<int64_t> sorted(experts);
    std::sort(sorted.begin(), sorted.end());
    sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
    for (auto& hint : hints_)
        if (hint.first == pos) {
            hint.second = std::move(sorted);  // a newer prediction replaces the older
            return;
        }
    hints_.emplace_back(pos, std::move(sorted));
}

void SlotCache::drop_guesses(int64_t pos, const std::vector<int64_t>& keep) {
    std::vector<int64_t>& pending = pending_[pos];
    for (size_t i = 0; i < pending.size();) {
        Slot& s = slots_[slot_of_[pending[i]]];
        if (std::find(keep.begin(), keep.end(), pending[i]) != keep.end()) {
            ++i;
            continue;
        }
        s.pending = false;
        if (s.guessed) s.pass_used = passes_[pos] - 1;  // stale: the first slots to give back
        pending[i] = pending.back();
        pending.pop_back();
    }
}

void SlotCache::issue_guesses(int64_t pos) {
    // nearest layer first
    std::sort(hints_.begin(), hints_.end(),
              [&](const auto& a, const auto& b) { return distance(pos, a.first) < distance(pos, b.first); });
    std::vector<int64_t> keys;
    for (const auto& [target, experts] : hints_) {
        const int64_t dist = distance(pos, target);
        keys.clear();
        for (int64_t e : experts) keys.push_back(target * experts_ + e);
        drop_guesses(target, keys);  // a newer prediction replaces the older one's guesses
        for (int64_t key : keys) guessing_[key] = 1;
        bool full = false;
        for (int64_t key : keys) {
            if (slot_of_[key] >= 0) continue;
            const int slot = claim(target, dist == 1, dist);
            if (slot < 0) {
                full = true;  // no free or stale slot: the real routing will load what is missing
                break;
            }
            Slot& s = slots_[slot];
            s.key = key;
            slot_of_[key] = slot;
            touch(slot, target);
            s.pass_used = passes_[target] + 1;  // for its layer's next pass
            s.guessed = s.pending = true;
            s.distance = dist;
            pending_[target].push_back(key);
            ++counters_.prefetches_issued;
            ++counters_.prefetches_issued_at[dist];
            counters_.prefetch_bytes += sources_[key].nbytes;
            queue_decode(slot, slot, guess_tasks_);
        }
        for (int64_t key : keys) guessing_[key] = 0;
        if (full) break;
    }
    hints_.clear();
}

void SlotCache::finish_guesses(ThreadsRunner threads) {
    if (!team_.started()) return;
    std::string error;
    double seconds;
    const auto start = std::chrono::steady_clock::now();
    const std::vector<int64_t>& failed = team_.finish(error, seconds, threads);
    counters_.wait_seconds += seconds_since(start);
    counters_.decode_seconds += seconds;
    for (int64_t slot : failed)
        if (slots_[slot].key >= 0) forget(int(slot));  // asked for, it is decoded again as a miss, and refused
    guess_tasks_.clear();
}

std::vector<int64_t> SlotCache::hold(int64_t layer, const std::vector<int64_t>& experts, ThreadsRunner threads) {
    unpin();
    const int64_t pos = position(layer);
    if (int64_t(experts.size()) > num_slots())
        throw std::invalid_argument("a hold asks for " + std::to_string(experts.size()) + " experts but the cache has " +
                                    std::to_string(num_slots()) + " slots");
    for (size_t i = 0; i < experts.size(); ++i) {
        check_expert(pos, layer, experts[i]);
        for (size_t j = 0; j < i; ++j)
            if (experts[j] == experts[i]) throw std::invalid_argument("a hold names each expert once");
    }
    finish_guesses(threads);
    if (++passes_[pos] % kAgingPasses == 0 && eviction_ == Eviction::kLfu)
        for (int64_t key = pos * experts_; key < (pos + 1) * experts_; ++key) uses_[key] >>= 1;
    hints_.erase(std::remove_if(hints_.begin(), hints_.end(), [&](const auto& h) { return h.first == pos; }),
                 hints_.end());  // the layer asks for its experts itself now
    std::vector<int64_t>& keys = wanted_keys_;
    keys.clear();
    for (int64_t e : experts) keys.push_back(pos * experts_ + e);
    drop_guesses(pos, keys);  // the layer's guesses it does not ask for were wrong
    for (int64_t key : pending_[pos]) slots_[slot_of_[key]].pending = false;
    pending_[pos].clear();
    std::vector<int64_t> out(experts.size());
    std::vector<size_t>& resident = resident_;
    std::vector<size_t>& missing = missing_;
    resident.clear();
    missing.clear();
    for (size_t i = 0; i < experts.size(); ++i) {
        const int64_t slot = slot_of_[keys[i]];
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
        const int slot = claim(pos, true, 0);
        if (slot < 0) throw std::runtime_error("no expert cache slot can be freed; the cache holds no unpinned slot");
        Slot& s = slots_[slot];
        s.key = keys[i];
        s.pins = 1;
        slot_of_[keys[i]] = slot;
        touch(slot, pos);
        out[i] = slot;
        counters_.miss_bytes += sources_[keys[i]].nbytes;
        queue_decode(slot, int64_t(i), tasks_);
    }
    issue_guesses(pos);
    for (size_t i : resident) use(int(out[i]), pos);
    std::string error;
    const auto start = std::chrono::steady_clock::now();
    std::vector<int64_t> failed = team_.run(tasks_, error, threads);
    tasks_.clear();
    const double seconds = seconds_since(start);
    counters_.decode_seconds += seconds;
    counters_.wait_seconds += seconds;
    team_.start(guess_tasks_);  // decoded while the step computes this layer
    for (size_t i : missing) use(int(out[i]), pos);
    if (!failed.empty()) {
        // Nothing of this hold stays pinned, and no expert that failed is cached.
        for (size_t i = 0; i < experts.size(); ++i) --slots_[out[i]].pins;
        for (int64_t i : failed)
            if (slots_[out[i]].key == keys[i]) forget(int(out[i]));
        const int64_t first = failed[0];  // the one `error` describes
        throw FormatError("the compressed expert " + std::to_string(experts[first]) + " of layer " +
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
    counters_.prefetches_issued_at.assign(taken.prefetches_issued_at.size(), 0);
    counters_.prefetches_used_at.assign(taken.prefetches_used_at.size(), 0);
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

int held_slots_entry(const int64_t* ids, int64_t rows, int64_t k, int64_t layer, const int64_t* const* predicted,
                     const int64_t* predicted_layers, int64_t predictions, ThreadsRunner threads, int64_t* out,
                     char* error, int64_t error_size) {
    try {
        SlotCache* cache = SlotCache::current();
        if (cache == nullptr)
            throw std::logic_error("held_expert_slots ran outside a step of an offloaded model (no begin_step)");
        const int64_t tokens = std::min(cache->step_tokens(), rows);
        thread_local std::vector<int64_t> wanted;  // kept for its capacity: one call per MoE layer of every step
        for (int64_t i = 0; i < predictions; ++i) {
            wanted.assign(predicted[i], predicted[i] + tokens * k);
            cache->guess(predicted_layers[i], wanted);
        }
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
