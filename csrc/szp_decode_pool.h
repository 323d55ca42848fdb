// A fixed pool of threads that run the szp decoder without Python, for the offloading runtime's CPU filler.
//
// In:  a job: the payloads of one expert's tensors and the slot memory each decodes into (raw pointers; the
//      binding keeps the buffers alive until the job is done).
// Out: the slot memory written; done() / wait() report completion and the first malformed payload's error.
//      A job runs once: on a worker, or on the thread that waits for it if no worker has started it.
// Workers never take the GIL, so decoding the next expert does not stall the model's Python thread, and each
// worker decodes on its own thread only (no OpenMP team on top of the pool).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "szp_format.h"

namespace szp {

struct DecodeTask {
    const szp_u8* payload;
    size_t size;
    void* out;
    int out_dtype;
};

class DecodeJob {
  public:
    explicit DecodeJob(std::vector<DecodeTask> tasks) : tasks_(std::move(tasks)) {}
    bool done() const { return done_.load(std::memory_order_acquire); }
    // Returns once the job has run, with the error of its first malformed payload (empty if none). A job no
    // worker has started yet runs here, on the caller's thread: a waiting caller has nothing better to do
    // with its core, and it saves waking a worker and switching back (most of a small expert's decode time
    // on a machine with few cores).
    const std::string& wait();
    double seconds() const { return seconds_; }  // decode time, valid once done()

  private:
    friend class DecodePool;
    bool claim() { return !claimed_.exchange(true, std::memory_order_acq_rel); }  // true for the one runner
    void run();

    std::vector<DecodeTask> tasks_;
    std::atomic<bool> claimed_{false};
    std::atomic<bool> done_{false};
    std::mutex mutex_;
    std::condition_variable finished_;
    std::string error_;
    double seconds_ = 0.0;
};

class DecodePool {
  public:
    // spare_cores: whether the machine has cores beyond the compute threads and these. Without, a lone urgent job
    // is left to its waiter (see submit); with, a worker starts it at once, overlapping whatever the waiter does first.
    DecodePool(int threads, bool spare_cores);
    ~DecodePool() { close(); }
    DecodePool(const DecodePool&) = delete;
    DecodePool& operator=(const DecodePool&) = delete;

    // An urgent job (a layer is waiting for it) runs before every queued one; others run in order.
    void submit(std::shared_ptr<DecodeJob> job, bool urgent);
    // Runs every job already submitted, then joins the threads; later submits are refused. Idempotent.
    void close();

  private:
    void work();

    std::vector<std::thread> threads_;
    std::deque<std::shared_ptr<DecodeJob>> queue_;  // urgent jobs first, each group in submission order
    size_t urgent_queued_ = 0;
    bool spare_cores_;
    std::mutex mutex_;
    std::condition_variable wake_;
    bool closing_ = false;
};

}  // namespace szp
