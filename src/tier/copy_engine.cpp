#include "tier/copy_engine.h"

#include <chrono>

#include "util/error.h"
#include "util/threadpool.h"

namespace spc {

namespace {
using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}
}  // namespace

CopyEngine::CopyEngine(SlowStore& store) : sh_(std::make_shared<Shared>(store)) {}

CopyEngine::~CopyEngine() {
  {
    std::lock_guard<std::mutex> lock(sh_->mu);
    sh_->stop = true;
  }
  sh_->cv_work.notify_all();
  if (thread_.joinable()) thread_.join();
  // Whatever is still queued runs here; batches a pool worker has started are waited for. Errors
  // of batches nobody waits on any more are dropped.
  std::unique_lock<std::mutex> lock(sh_->mu);
  while (sh_->run_one(lock)) {
  }
  sh_->cv_done.wait(lock, [&] { return sh_->completed + 1 == sh_->next_ticket; });
}

void CopyEngine::run_on(ThreadPool* pool) {
  SPC_CHECK(pool == nullptr || pool->size() > 1, "copy engine: a pool without worker threads cannot run copies");
  pool_ = pool;
}

CopyEngine::Ticket CopyEngine::submit_gather(std::vector<RowRef> refs, void* dst) {
  SPC_CHECK(refs.empty() || dst != nullptr, "copy engine: null destination for a gather of %zu rows", refs.size());
  Shared& s = *sh_;
  Ticket t;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    t = s.next_ticket++;
    uint32_t delay_us = 0;
    if (s.delay_max_us > 0) delay_us = (uint32_t)(s.delay_rng() % ((uint64_t)s.delay_max_us + 1));
    s.queue.push_back(Job{t, std::move(refs), dst, delay_us});
  }
  if (pool_) {
    // Each posted job runs the batch at the queue's head (batches keep their order); it holds the
    // shared state, not the engine, so one that runs after the engine is gone finds nothing to do.
    pool_->post_background([sh = sh_] {
      std::unique_lock<std::mutex> lock(sh->mu);
      sh->run_one(lock);
    });
  } else {
    if (!thread_.joinable()) thread_ = std::thread([this] { thread_main(); });
    s.cv_work.notify_one();
  }
  return t;
}

bool CopyEngine::Shared::run_one(std::unique_lock<std::mutex>& lock) {
  if (queue.empty()) return false;
  Job job = std::move(queue.front());
  queue.pop_front();
  lock.unlock();

  const auto t0 = Clock::now();
  std::exception_ptr err;
  if (job.delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(job.delay_us));
  try {
    if (!job.refs.empty()) store.read_rows(job.refs.data(), job.refs.size(), job.dst);
  } catch (...) {
    err = std::current_exception();
  }
  const double ms = ms_since(t0);

  lock.lock();
  stats.copy_ms += ms;
  stats.batches += 1;
  if (err) {
    errors[job.ticket] = err;
  } else {
    stats.rows += job.refs.size();
    stats.bytes += job.refs.size() * store.geometry().row_bytes();
  }
  if (job.ticket == completed + 1) {
    completed = job.ticket;
    while (!done_above.empty() && *done_above.begin() == completed + 1) {
      completed = *done_above.begin();
      done_above.erase(done_above.begin());
    }
  } else {
    done_above.insert(job.ticket);
  }
  cv_done.notify_all();
  return true;
}

void CopyEngine::wait(Ticket t) {
  Shared& s = *sh_;
  std::unique_lock<std::mutex> lock(s.mu);
  SPC_CHECK(t >= 1 && t < s.next_ticket, "copy engine: wait on unknown ticket %llu (last issued %llu)",
            (unsigned long long)t, (unsigned long long)(s.next_ticket - 1));
  // Waits for every batch up to t (as when one thread ran them in order).
  if (s.completed < t) {
    const auto t0 = Clock::now();
    // Batches up to t that no executor has started run here, in order; then wait for the rest.
    while (s.completed < t) {
      if (!s.queue.empty() && s.queue.front().ticket <= t) s.run_one(lock);
      else s.cv_done.wait(lock);
    }
    s.stats.stall_ms += ms_since(t0);
  }
  auto it = s.errors.find(t);
  if (it != s.errors.end()) std::rethrow_exception(it->second);
}

bool CopyEngine::done(Ticket t) const {
  std::lock_guard<std::mutex> lock(sh_->mu);
  return t >= 1 && sh_->is_done(t);
}

void CopyEngine::gather_now(const RowRef* refs, size_t n, void* dst) {
  Shared& s = *sh_;
  const auto t0 = Clock::now();
  std::exception_ptr err;
  try {
    if (n > 0) s.store.read_rows(refs, n, dst);
  } catch (...) {
    err = std::current_exception();
  }
  const double ms = ms_since(t0);
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.stats.copy_ms += ms;
    s.stats.stall_ms += ms;
    s.stats.batches += 1;
    if (!err) {
      s.stats.rows += n;
      s.stats.bytes += n * s.store.geometry().row_bytes();
    }
  }
  if (err) std::rethrow_exception(err);
}

CopyEngine::Stats CopyEngine::stats() const {
  std::lock_guard<std::mutex> lock(sh_->mu);
  return sh_->stats;
}

void CopyEngine::reset_stats() {
  std::lock_guard<std::mutex> lock(sh_->mu);
  sh_->stats = Stats{};
}

void CopyEngine::inject_delays(uint32_t max_us, uint64_t seed) {
  std::lock_guard<std::mutex> lock(sh_->mu);
  sh_->delay_max_us = max_us;
  sh_->delay_rng.seed(seed);
}

void CopyEngine::thread_main() {
  Shared& s = *sh_;
  std::unique_lock<std::mutex> lock(s.mu);
  for (;;) {
    s.cv_work.wait(lock, [&] { return s.stop || !s.queue.empty(); });
    if (s.queue.empty()) return;  // stopped and drained
    s.run_one(lock);
  }
}

}  // namespace spc
