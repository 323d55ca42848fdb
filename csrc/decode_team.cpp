// The decode team of decode_team.h.
#include "decode_team.h"

#include <chrono>
#include <exception>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SZP_SPIN_PAUSE() _mm_pause()
#else
#define SZP_SPIN_PAUSE() std::this_thread::yield()
#endif

#include "szp_codec.h"

namespace szp {

DecodeTeam::DecodeTeam(int helpers) {
    for (int i = 0; i < helpers; ++i) threads_.emplace_back([this] { work(); });
}

DecodeTeam::~DecodeTeam() {
    {
        std::lock_guard<std::mutex> lock(sleep_mutex_);
        stopping_.store(true);
    }
    wake_.notify_all();
    for (std::thread& t : threads_) t.join();
}

namespace {
// How long a helper spins without a task before it sleeps: a few MoE layers of a small model's step, so the
// misses of one step find it awake; measured steps take ~1 ms on the embedded model.
constexpr double kSpinSeconds = 500e-6;
}  // namespace

void DecodeTeam::wake_helpers() {
    {
        std::lock_guard<std::mutex> lock(sleep_mutex_);
        ++wakes_;
    }
    wake_.notify_all();
}

void DecodeTeam::activate() { active_.store(true); }

void DecodeTeam::deactivate() { active_.store(false); }

namespace {
constexpr int kIndexBits = 20;
constexpr uint64_t kIndexMask = (uint64_t(1) << kIndexBits) - 1;
}  // namespace

int64_t DecodeTeam::run(const std::vector<ChunkTask>& tasks, std::string& error, ThreadsRunner threads) {
    if (tasks.empty()) return -1;
    if (tasks.size() > kIndexMask) throw std::invalid_argument("a decode team runs at most 2^20 - 1 tasks at once");
    tasks_.store(&tasks, std::memory_order_relaxed);
    failed_ = -1;
    error_.clear();
    done_.store(0);
    const uint64_t id = (++run_id_) & ((uint64_t(1) << (64 - 2 * kIndexBits)) - 1);
    claim_.store(id << (2 * kIndexBits) | uint64_t(tasks.size()) << kIndexBits, std::memory_order_release);
    if (active_.load(std::memory_order_relaxed) && sleeping_.load() > 0) wake_helpers();  // they join when they can
    if (threads != nullptr) threads(this, &DecodeTeam::drain_current);
    else drain(id);
    while (done_.load(std::memory_order_acquire) < tasks.size()) SZP_SPIN_PAUSE();
    error = error_;
    return failed_;
}

void DecodeTeam::drain_current(void* team) {
    DecodeTeam& self = *static_cast<DecodeTeam*>(team);
    self.drain(self.claim_.load(std::memory_order_acquire) >> (2 * kIndexBits));
}

void DecodeTeam::drain(uint64_t run_id) {
    for (;;) {
        uint64_t claim = claim_.load(std::memory_order_acquire);
        const uint64_t index = claim & kIndexMask, count = (claim >> kIndexBits) & kIndexMask;
        if ((claim >> (2 * kIndexBits)) != run_id || index >= count) return;
        if (!claim_.compare_exchange_weak(claim, claim + 1, std::memory_order_acq_rel)) continue;
        const ChunkTask& t = (*tasks_.load(std::memory_order_relaxed))[index];
        try {
            decode_chunks(t.payload, t.size, t.out, t.out_dtype, t.first, t.last);
        } catch (const std::exception& e) {
            std::lock_guard<std::mutex> lock(error_mutex_);
            if (failed_ < 0) {
                failed_ = t.owner;
                error_ = e.what();
            }
        }
        done_.fetch_add(1, std::memory_order_acq_rel);
    }
}

void DecodeTeam::work() {
    uint64_t seen = 0, woken = 0;
    auto last_task = std::chrono::steady_clock::now();
    for (;;) {
        if (stopping_.load(std::memory_order_relaxed)) return;
        const bool idle = std::chrono::duration<double>(std::chrono::steady_clock::now() - last_task).count() > kSpinSeconds;
        if (!active_.load(std::memory_order_acquire) || idle) {
            std::unique_lock<std::mutex> lock(sleep_mutex_);
            sleeping_.fetch_add(1);
            // woken by activate, by a run while active, or to stop
            wake_.wait(lock, [&] { return stopping_.load() || (wakes_ != woken && active_.load()); });
            sleeping_.fetch_sub(1);
            woken = wakes_;
            if (stopping_.load()) return;
            last_task = std::chrono::steady_clock::now();
        }
        const uint64_t run_id = claim_.load(std::memory_order_acquire) >> (2 * kIndexBits);
        if (run_id != seen) {
            seen = run_id;
            drain(run_id);
            last_task = std::chrono::steady_clock::now();
        } else {
            SZP_SPIN_PAUSE();
        }
    }
}

}  // namespace szp
