// The decode team of decode_team.h.
#include "decode_team.h"

#include <algorithm>
#include <chrono>
#include <exception>

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
// How long a helper spins without a task before it sleeps: longer than a decode step and the engine's work
// between two (~1-1.5 ms on the embedded model), so a generation that misses now and then keeps it awake.
constexpr double kSpinSeconds = 2e-3;
}  // namespace

void DecodeTeam::wake_helpers() {
    {
        std::lock_guard<std::mutex> lock(sleep_mutex_);
        ++wakes_;
    }
    wake_.notify_all();
}

namespace {
constexpr int kIndexBits = 20;
constexpr uint64_t kIndexMask = (uint64_t(1) << kIndexBits) - 1;
}  // namespace

void DecodeTeam::publish(const ChunkTask* first, size_t count) {
    tasks_.store(first, std::memory_order_relaxed);
    done_.store(0);
    const uint64_t id = (++run_id_) & ((uint64_t(1) << (64 - 2 * kIndexBits)) - 1);
    claim_.store(id << (2 * kIndexBits) | uint64_t(count) << kIndexBits, std::memory_order_release);
    if (sleeping_.load() > 0) wake_helpers();  // they join when they can
}

void DecodeTeam::complete(size_t count, ThreadsRunner threads) {
    if (threads != nullptr) threads(this, &DecodeTeam::drain_current);
    else drain_current(this);
    while (done_.load(std::memory_order_acquire) < count) SZP_SPIN_PAUSE();
}

const std::vector<int64_t>& DecodeTeam::run(const std::vector<ChunkTask>& tasks, std::string& error,
                                            ThreadsRunner threads) {
    start(tasks);  // the helpers take tasks from now on; finish has this thread (and `threads`) take them too
    double unused;
    return finish(error, unused, threads);
}

void DecodeTeam::start(const std::vector<ChunkTask>& tasks) {
    std::string unused_error;
    double unused_seconds;
    finish(unused_error, unused_seconds);
    failed_.clear();
    error_.clear();
    if (tasks.empty()) return;
    started_ = &tasks;
    started_window_ = std::min<size_t>(kIndexMask, tasks.size());
    started_at_ = std::chrono::steady_clock::now();
    last_done_ns_.store(0);
    publish(tasks.data(), started_window_);
}

const std::vector<int64_t>& DecodeTeam::finish(std::string& error, double& seconds, ThreadsRunner threads) {
    seconds = 0.0;
    if (started_ != nullptr) {
        const std::vector<ChunkTask>& tasks = *started_;
        complete(started_window_, threads);
        // in windows the claim word can count (a huge model's prefill may need more tasks than that)
        for (size_t first = started_window_; first < tasks.size(); first += kIndexMask) {
            const size_t count = std::min<size_t>(kIndexMask, tasks.size() - first);
            publish(tasks.data() + first, count);
            complete(count, threads);
        }
        started_ = nullptr;
        const auto ended = std::chrono::steady_clock::time_point(std::chrono::nanoseconds(last_done_ns_.load()));
        seconds = std::chrono::duration<double>(ended - started_at_).count();
    }
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
        const ChunkTask& t = tasks_.load(std::memory_order_relaxed)[index];
        try {
            decode_chunks(t.payload, t.size, t.out, t.out_dtype, t.first, t.last);
        } catch (const std::exception& e) {
            std::lock_guard<std::mutex> lock(error_mutex_);
            if (failed_.empty()) error_ = e.what();
            failed_.push_back(t.owner);
        }
        // the latest end of any task, published before the count that lets the caller read it
        const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                std::chrono::steady_clock::now().time_since_epoch()).count();
        for (int64_t latest = last_done_ns_.load(); latest < now && !last_done_ns_.compare_exchange_weak(latest, now);) {
        }
        done_.fetch_add(1, std::memory_order_acq_rel);
    }
}

void DecodeTeam::work() {
    uint64_t seen = claim_.load() >> (2 * kIndexBits), woken = 0;
    auto last_task = std::chrono::steady_clock::now();
    bool asleep = true;  // until the first run wakes it
    for (unsigned spins = 0;; ++spins) {
        if (stopping_.load(std::memory_order_relaxed)) return;
        // the clock only now and then: a spinning helper reads the run word, not the time
        if (asleep || (spins % 256 == 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - last_task)
                                                   .count() > kSpinSeconds)) {
            std::unique_lock<std::mutex> lock(sleep_mutex_);
            sleeping_.fetch_add(1);
            wake_.wait(lock, [&] { return stopping_.load() || wakes_ != woken; });  // a run, or the end
            sleeping_.fetch_sub(1);
            woken = wakes_;
            asleep = false;
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
