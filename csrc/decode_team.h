// A team that splits the decodes a waiting thread needs now across it, the threads of a pool it lends (torch's) and
// helper threads that spin while misses keep coming, for the expert cache's misses and guesses (slot_cache.h).
//
// In:  run(tasks): chunk ranges of szp payloads and where each decodes to, from the thread that needs them;
//      start(tasks): the same for decodes needed later (guesses), which the helpers take while the caller computes.
// Out: every task decoded when run (or, for start, finish) returns; the owners of the tasks that failed.
//
// Why not the decode pool's workers (szp_decode_pool.h): they sleep on a condition variable, and on the machines
// measured a wake-up and the hand-back to the waiting thread cost more than a small expert's decode. A run wakes
// the helpers that sleep; they then spin until kSpinSeconds pass without a task, which spans the steps of a
// generation that keeps missing (so a task reaches one within ~a microsecond, and the caller pays no wake-up:
// on the 2-core VM a futex wake per step took ~7% of the model thread and the helper came too late to share
// the decode), and sleep otherwise (a cache that always hits never wakes them). They are for cores that nothing
// else computes on (the caller sizes the team).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "szp_format.h"

namespace szp {

// Runs body(context) once on each of a thread pool's threads (the caller's among them) and returns when all have:
// torch's intra-op threads, idle while a compiled step waits in its host op (torch_ops.cpp), lend a hand that way.
using ThreadsRunner = void (*)(void* context, void (*body)(void*));

struct ChunkTask {
    const szp_u8* payload;
    size_t size;
    void* out;
    int out_dtype;
    szp_u64 first, last;  // chunk range
    int64_t owner;  // the caller's tag, reported with a failure
};

class DecodeTeam {
  public:
    explicit DecodeTeam(int helpers);
    ~DecodeTeam();
    DecodeTeam(const DecodeTeam&) = delete;
    DecodeTeam& operator=(const DecodeTeam&) = delete;

    // Decodes every task, on this thread (with `threads`, on each of its pool's) and the helpers; returns the
    // owners of the tasks that failed (empty if none; an owner once per failed task) and sets error to the first
    // failure's message. Finishes a started run first. (start, then finish.)
    const std::vector<int64_t>& run(const std::vector<ChunkTask>& tasks, std::string& error,
                                    ThreadsRunner threads = nullptr);
    // Hands `tasks` to the helpers and returns at once; `tasks` must stay as they are until finish() returns.
    // Without helpers nothing decodes them before finish().
    void start(const std::vector<ChunkTask>& tasks);
    bool started() const { return started_ != nullptr; }
    // Decodes what the started run's helpers have not taken (as run does) and waits for the rest; returns as run
    // does, and the seconds from start() to the last task's end. Nothing to do without a started run.
    const std::vector<int64_t>& finish(std::string& error, double& seconds, ThreadsRunner threads = nullptr);

  private:
    void publish(const ChunkTask* first, size_t count);  // a window of tasks, for whoever drains it
    void complete(size_t count, ThreadsRunner threads);  // drain the published window and wait for its end
    void work();
    void drain(uint64_t run_id);
    static void drain_current(void* team);  // a ThreadsRunner body: drain the run in progress

    std::vector<std::thread> threads_;
    // run id (24 bits) | the window's task count (20 bits) | the next task index (20 bits), in one word: a thread
    // claims task i of the window it saw, with that window's count, or nothing. Only a claimed task's window can
    // be running, so the tasks_ read after a claim are that window's. A run of more tasks takes several windows.
    std::atomic<uint64_t> claim_{0};
    std::atomic<size_t> done_{0};
    std::atomic<const ChunkTask*> tasks_{nullptr};  // the window of the run in progress
    uint64_t run_id_ = 0;
    const std::vector<ChunkTask>* started_ = nullptr;  // the started run's tasks, until finish
    size_t started_window_ = 0;  // how many of them the first window holds
    std::chrono::steady_clock::time_point started_at_;
    std::atomic<int64_t> last_done_ns_{0};  // steady_clock time the latest window's last task ended
    std::mutex error_mutex_;
    std::vector<int64_t> failed_;
    std::string error_;
    std::atomic<bool> stopping_{false};
    std::atomic<int> sleeping_{0};  // helpers waiting on wake_
    uint64_t wakes_ = 0;  // bumped (under sleep_mutex_) to wake the sleeping helpers
    std::mutex sleep_mutex_;
    std::condition_variable wake_;
    void wake_helpers();
};

}  // namespace szp
