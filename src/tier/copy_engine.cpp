#include "tier/copy_engine.h"

#include <chrono>

#include "util/error.h"

namespace spc {

namespace {
using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}
}  // namespace

CopyEngine::CopyEngine(SlowStore& store) : store_(store) { thread_ = std::thread([this] { worker(); }); }

CopyEngine::~CopyEngine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  thread_.join();
}

CopyEngine::Ticket CopyEngine::submit_gather(std::vector<RowRef> refs, void* dst) {
  SPC_CHECK(refs.empty() || dst != nullptr, "copy engine: null destination for a gather of %zu rows", refs.size());
  Ticket t;
  {
    std::lock_guard<std::mutex> lock(mu_);
    t = next_ticket_++;
    queue_.push_back(Job{t, std::move(refs), dst});
  }
  cv_work_.notify_one();
  return t;
}

void CopyEngine::wait(Ticket t) {
  std::unique_lock<std::mutex> lock(mu_);
  SPC_CHECK(t >= 1 && t < next_ticket_, "copy engine: wait on unknown ticket %llu (last issued %llu)",
            (unsigned long long)t, (unsigned long long)(next_ticket_ - 1));
  if (completed_ < t) {
    const auto t0 = Clock::now();
    cv_done_.wait(lock, [&] { return completed_ >= t; });
    stats_.stall_ms += ms_since(t0);
  }
  auto it = errors_.find(t);
  if (it != errors_.end()) std::rethrow_exception(it->second);
}

bool CopyEngine::done(Ticket t) const {
  std::lock_guard<std::mutex> lock(mu_);
  return t >= 1 && completed_ >= t;
}

void CopyEngine::gather_now(const RowRef* refs, size_t n, void* dst) {
  const auto t0 = Clock::now();
  std::exception_ptr err;
  try {
    if (n > 0) store_.read_rows(refs, n, dst);
  } catch (...) {
    err = std::current_exception();
  }
  const double ms = ms_since(t0);
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.copy_ms += ms;
    stats_.stall_ms += ms;
    stats_.batches += 1;
    if (!err) {
      stats_.rows += n;
      stats_.bytes += n * store_.geometry().row_bytes();
    }
  }
  if (err) std::rethrow_exception(err);
}

CopyEngine::Stats CopyEngine::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void CopyEngine::reset_stats() {
  std::lock_guard<std::mutex> lock(mu_);
  stats_ = Stats{};
}

void CopyEngine::inject_delays(uint32_t max_us, uint64_t seed) {
  std::lock_guard<std::mutex> lock(mu_);
  delay_max_us_ = max_us;
  delay_rng_.seed(seed);
}

void CopyEngine::worker() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_work_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stop_ and drained
    Job job = std::move(queue_.front());
    queue_.pop_front();
    uint32_t delay_us = 0;
    if (delay_max_us_ > 0) delay_us = (uint32_t)(delay_rng_() % ((uint64_t)delay_max_us_ + 1));
    lock.unlock();

    const auto t0 = Clock::now();
    std::exception_ptr err;
    if (delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
    try {
      if (!job.refs.empty()) store_.read_rows(job.refs.data(), job.refs.size(), job.dst);
    } catch (...) {
      err = std::current_exception();
    }
    const double ms = ms_since(t0);

    lock.lock();
    stats_.copy_ms += ms;
    stats_.batches += 1;
    if (err) {
      errors_[job.ticket] = err;
    } else {
      stats_.rows += job.refs.size();
      stats_.bytes += job.refs.size() * store_.geometry().row_bytes();
    }
    completed_ = job.ticket;
    cv_done_.notify_all();
  }
}

}  // namespace spc
