// Asynchronous batched copies from the slow store into caller-owned fast buffers.
// One background thread; tickets are processed in submission order, one store read_rows call per batch.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "tier/slow_store.h"

namespace spc {

class CopyEngine {
 public:
  explicit CopyEngine(SlowStore& store);  // starts one background copy thread
  ~CopyEngine();                           // drains pending work (dst buffers must still be valid) and joins
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  using Ticket = uint64_t;  // 1, 2, 3, ... in submission order

  // Enqueues a gather of refs into dst (dst + i*row_bytes <- row refs[i], or row refs[i].dst_row
  // of dst when that is set: a scatter into slots); returns at once.
  // dst must stay valid until the ticket has been waited on (or the engine destroyed).
  Ticket submit_gather(std::vector<RowRef> refs, void* dst);
  // Blocks until the ticket's copy is complete; the time blocked is added to stall time.
  // Rethrows the copy's error (spc::Error) if it failed (every time it is waited on).
  void wait(Ticket t);
  // True once the ticket's copy has finished (successfully or not).
  bool done(Ticket t) const;
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
  };
  void worker();

  SlowStore& store_;
  mutable std::mutex mu_;
  std::condition_variable cv_work_;  // worker waits for jobs
  mutable std::condition_variable cv_done_;  // waiters wait for completions
  std::deque<Job> queue_;
  Ticket next_ticket_ = 1;
  Ticket completed_ = 0;  // all tickets <= completed_ are done
  std::map<Ticket, std::exception_ptr> errors_;
  bool stop_ = false;
  Stats stats_;
  uint32_t delay_max_us_ = 0;
  std::mt19937_64 delay_rng_;
  std::thread thread_;
};

}  // namespace spc
