// The decode thread pool of szp_decode_pool.h.
#include "szp_decode_pool.h"

#include <chrono>
#include <stdexcept>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "szp_codec.h"

namespace szp {

void DecodeJob::run() {
    const auto start = std::chrono::steady_clock::now();
    std::string error;
    for (const DecodeTask& t : tasks_) {
        try {
            decode(t.payload, t.size, t.out, t.out_dtype);
        } catch (const std::exception& e) {
            error = e.what();
            break;
        }
    }
    std::lock_guard<std::mutex> lock(mutex_);
    seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    error_ = std::move(error);
    done_.store(true, std::memory_order_release);
    finished_.notify_all();
}

const std::string& DecodeJob::wait() {
    if (!done() && claim()) run();  // still queued: run it here (the worker that pops it later skips it)
    if (!done()) {
        std::unique_lock<std::mutex> lock(mutex_);
        finished_.wait(lock, [this] { return done(); });
    }
    return error_;
}

DecodePool::DecodePool(int threads, bool spare_cores) : spare_cores_(spare_cores) {
    if (threads < 1) throw std::invalid_argument("a decode pool needs at least 1 thread");
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { work(); });
}

void DecodePool::submit(std::shared_ptr<DecodeJob> job, bool urgent) {
    bool wake;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (closing_) throw std::runtime_error("the decode pool is closed");
        if (urgent) queue_.insert(queue_.begin() + urgent_queued_++, std::move(job));
        else queue_.push_back(std::move(job));
        // Without spare cores a lone urgent job is left to its waiter, who is about to ask for it
        // (DecodeJob::wait): a worker woken for it would take the waiter's core, and cost two thread switches on
        // its path. A second one goes to a worker, in parallel.
        wake = !urgent || urgent_queued_ > 1 || spare_cores_;
    }
    if (wake) wake_.notify_one();
}

void DecodePool::close() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (closing_) return;
        closing_ = true;
    }
    wake_.notify_all();
    for (std::thread& t : threads_) t.join();
}

void DecodePool::work() {
#ifdef _OPENMP
    omp_set_num_threads(1);  // the pool's threads are the parallelism
#endif
    for (;;) {
        std::shared_ptr<DecodeJob> job;
        {
            std::unique_lock<std::mutex> lock(mutex_);
            wake_.wait(lock, [this] { return closing_ || !queue_.empty(); });
            if (queue_.empty()) return;  // closing, and every submitted job has run
            job = std::move(queue_.front());
            queue_.pop_front();
            if (urgent_queued_ > 0) --urgent_queued_;
        }
        if (job->claim()) job->run();  // else its waiter took it
    }
}

}  // namespace szp
