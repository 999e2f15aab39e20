#include "util/threadpool.h"

#include <algorithm>

#include "util/error.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define SPC_PAUSE() _mm_pause()
#else
#define SPC_PAUSE() ((void)0)
#endif

namespace spc {

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads) {
  SPC_CHECK(n_threads >= 1, "thread count must be >= 1, got %d", n_threads);
  for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
    generation_.fetch_add(1);
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::worker_loop(int index) {
  uint64_t seen = 0;
  for (;;) {
    // Spin a while for the next job, then sleep on the condition variable.
    uint64_t gen = generation_.load(std::memory_order_acquire);
    for (int spin = 0; gen == seen && spin < 20000; ++spin) {
      SPC_PAUSE();
      gen = generation_.load(std::memory_order_acquire);
    }
    if (gen == seen) {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      gen = generation_.load(std::memory_order_acquire);
    }
    seen = gen;
    if (stop_.load()) return;
    (*job_)(index);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::run(const std::function<void(int)>& fn) {
  if (n_threads_ == 1) {
    fn(0);
    return;
  }
  job_ = &fn;
  pending_.store(n_threads_ - 1, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(mu_);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  cv_.notify_all();
  fn(0);
  while (pending_.load(std::memory_order_acquire) != 0) SPC_PAUSE();
  job_ = nullptr;
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn) {
  if (n <= 0) return;
  const int nt = (int)std::min<int64_t>(n_threads_, n);
  if (nt == 1) {
    fn(0, n, 0);
    return;
  }
  run([&](int t) {
    if (t >= nt) return;
    const int64_t begin = n * t / nt, end = n * (t + 1) / nt;
    fn(begin, end, t);
  });
}

}  // namespace spc
