// Asynchronous batched copies from the slow store into caller-owned fast buffers: one store
// read_rows call per batch, tickets the compute waits on.
// Who runs a batch (run_on): the engine's own background thread (the default, started at the first
// submit), or the idle workers of a ThreadPool, for a machine whose cores are all computing: there
// a copy thread can only run by preempting a compute thread (a wake-up system call and two context
// switches per batch), while the pool's workers wait between jobs every few microseconds anyway.
// Either way a waiter whose batch has not started runs it itself, so a wait never depends on an
// executor getting to it.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "tier/slow_store.h"

namespace spc {

class ThreadPool;

class CopyEngine {
 public:
  explicit CopyEngine(SlowStore& store);
  ~CopyEngine();  // finishes pending work (dst buffers must still be valid), joins its thread
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  using Ticket = uint64_t;  // 1, 2, 3, ... in submission order

  // Enqueues a gather of refs into dst (dst + i*row_bytes <- row refs[i], or row refs[i].dst_row
  // of dst when that is set: a scatter into slots); returns at once.
  // dst must stay valid until the ticket has been waited on (or the engine destroyed).
  Ticket submit_gather(std::vector<RowRef> refs, void* dst);
  // Blocks until the copies of this ticket and of every earlier one are complete, running those
  // not yet started itself; the time blocked is added to stall time.
  // Rethrows the copy's error (spc::Error) if it failed (every time it is waited on).
  void wait(Ticket t);
  // True once the ticket's copy has finished (successfully or not).
  bool done(Ticket t) const;
  // Where later submits run: nullptr = the engine's own thread (default); a pool with worker
  // threads = its idle workers (ThreadPool::post_background). The pool must outlive every batch
  // submitted while it was set (or be destroyed, which runs its queued jobs).
  void run_on(ThreadPool* pool);
  // Synchronous gather on the caller thread; counted as copy time and stall time.
  void gather_now(const RowRef* refs, size_t n, void* dst);

  struct Stats {
    double copy_ms = 0;   // time spent copying (worker batches, including injected delays, plus gather_now)
    double stall_ms = 0;  // time callers spent blocked in wait() plus gather_now
    uint64_t bytes = 0;
    uint64_t rows = 0;
    uint64_t batches = 0;  // completed batches (async and gather_now), failed ones included
  };
  Stats stats() const;
  void reset_stats();

  // Test hook: each async batch sleeps a random 0..max_us microseconds before copying
  // (std::mt19937_64 seeded with seed: a deterministic sequence). max_us = 0 disables.
  void inject_delays(uint32_t max_us, uint64_t seed);

 private:
  struct Job {
    Ticket ticket;
    std::vector<RowRef> refs;
    void* dst;
    uint32_t delay_us;  // injected delay (test hook), drawn at submission
  };
  // The queue and the completion state live apart from the engine so that a pool job posted for
  // it stays harmless after the engine is gone (it finds the queue empty).
  struct Shared {
    explicit Shared(SlowStore& s) : store(s) {}
    SlowStore& store;
    std::mutex mu;
    std::condition_variable cv_work;  // the engine's thread waits for jobs
    std::condition_variable cv_done;  // waiters wait for completions
    std::deque<Job> queue;
    Ticket next_ticket = 1;
    Ticket completed = 0;        // all tickets <= completed are done
    std::set<Ticket> done_above;  // finished tickets > completed (executors finish out of order)
    std::map<Ticket, std::exception_ptr> errors;
    bool stop = false;
    Stats stats;
    uint32_t delay_max_us = 0;
    std::mt19937_64 delay_rng;
    bool is_done(Ticket t) const { return t <= completed || done_above.count(t) > 0; }
    // Runs the job at the queue's head, if any (lock held on entry and on return).
    bool run_one(std::unique_lock<std::mutex>& lock);
  };
  void thread_main();

  std::shared_ptr<Shared> sh_;
  ThreadPool* pool_ = nullptr;
  std::thread thread_;
};

}  // namespace spc
