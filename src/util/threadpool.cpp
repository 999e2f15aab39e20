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

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads), ranges_(n_threads > 0 ? n_threads : 1) {
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
  while (run_background()) {
  }
}

void ThreadPool::post_background(std::function<void()> fn) {
  SPC_CHECK(n_threads_ > 1, "post_background needs a pool with worker threads (size %d)", n_threads_);
  {
    std::lock_guard<std::mutex> lock(bg_mu_);
    bg_.push_back(std::move(fn));
    bg_queued_.fetch_add(1);
  }
  // Spinning workers see bg_queued_; only a sleeping one needs the (costly) wake-up.
  if (sleeping_.load() > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    cv_.notify_one();
  }
}

bool ThreadPool::run_background() {
  std::function<void()> fn;
  {
    std::lock_guard<std::mutex> lock(bg_mu_);
    if (bg_.empty()) return false;
    fn = std::move(bg_.front());
    bg_.pop_front();
    bg_queued_.fetch_sub(1);
  }
  fn();
  return true;
}

void ThreadPool::work(int index) {
  for (;;) {
    const int64_t task = next_.fetch_add(1);
    if (task >= n_tasks_) return;
    (*job_)(task, index);
    done_.fetch_add(1);
  }
}

void ThreadPool::worker_loop(int index) {
  uint64_t seen = 0;
  for (;;) {
    uint64_t gen = generation_.load();
    for (int spin = 0; gen == seen && spin < 20000; ++spin) {
      if (bg_queued_.load(std::memory_order_relaxed) > 0 && run_background()) spin = 0;
      else SPC_PAUSE();
      gen = generation_.load();
    }
    if (gen == seen) {
      std::unique_lock<std::mutex> lock(mu_);
      sleeping_.fetch_add(1);
      cv_.wait(lock, [&] { return generation_.load() != seen || bg_queued_.load() > 0; });
      sleeping_.fetch_sub(1);
      gen = generation_.load();
      if (gen == seen) {  // woken for background work
        lock.unlock();
        while (run_background()) {
        }
        continue;
      }
    }
    seen = gen;
    if (stop_.load()) return;
    // Enter the job only if it is still open: the caller may already have finished every
    // task and returned, in which case job_ must not be touched.
    active_.fetch_add(1);
    if (closed_.load() < gen) work(index);
    active_.fetch_sub(1);
  }
}

void ThreadPool::for_each_task(int64_t n_tasks, const std::function<void(int64_t, int)>& fn) {
  if (n_tasks <= 0) return;
  if (n_threads_ == 1 || n_tasks == 1) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
    return;
  }
  job_ = &fn;
  n_tasks_ = n_tasks;
  next_.store(0);
  done_.store(0);
  uint64_t gen;
  {
    std::lock_guard<std::mutex> lock(mu_);
    gen = generation_.fetch_add(1) + 1;
  }
  cv_.notify_all();
  work(0);
  while (done_.load() != n_tasks) SPC_PAUSE();
  closed_.store(gen);
  while (active_.load() != 0) SPC_PAUSE();
  job_ = nullptr;
}

namespace {

// parallel_for: each thread owns one contiguous range and takes it from the front in steps of
// about 1/kStepsPerRange of it; a thread whose range is empty takes steps from the back of the
// others'. Consecutive steps of one thread continue one stream through memory (the decode
// matmuls' software and hardware prefetch run on past a step's end into the next), where a few
// chunks per thread claimed in turn made each thread restart its stream at every chunk: paired
// runs (bench --interleave) put the contiguous ranges at 0.93x (fp32) and 0.90x (int8) of the
// chunked decode step time of `full` at 512 tokens, 0.95x at 8K, and 0.96x for `specache:1` at
// 512. Stealing keeps the balance of dynamic chunks (a late or interrupted worker costs at most a
// step).
constexpr int64_t kStepsPerRange = 16;

constexpr uint64_t pack_range(uint64_t lo, uint64_t hi) { return (hi << 32) | lo; }

bool take_front(ThreadPool::StealRange& r, int64_t step, int64_t& b, int64_t& e) {
  uint64_t v = r.lohi.load(std::memory_order_relaxed);
  for (;;) {
    const uint64_t lo = v & 0xffffffffu, hi = v >> 32;
    if (lo >= hi) return false;
    const uint64_t nl = std::min<uint64_t>(lo + (uint64_t)step, hi);
    if (r.lohi.compare_exchange_weak(v, pack_range(nl, hi))) {
      b = (int64_t)lo, e = (int64_t)nl;
      return true;
    }
  }
}

bool take_back(ThreadPool::StealRange& r, int64_t step, int64_t& b, int64_t& e) {
  uint64_t v = r.lohi.load(std::memory_order_relaxed);
  for (;;) {
    const uint64_t lo = v & 0xffffffffu, hi = v >> 32;
    if (lo >= hi) return false;
    const uint64_t nh = hi - std::min<uint64_t>((uint64_t)step, hi - lo);
    if (r.lohi.compare_exchange_weak(v, pack_range(lo, nh))) {
      b = (int64_t)nh, e = (int64_t)hi;
      return true;
    }
  }
}

}  // namespace

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn) {
  if (n <= 0) return;
  if (n_threads_ == 1) {
    fn(0, n, 0);
    return;
  }
  if (n > (int64_t)0xffffffff) {  // beyond the 32-bit packed ranges: plain chunks
    const int64_t n_chunks = 4LL * n_threads_;
    for_each_task(n_chunks, [&](int64_t c, int t) { fn(n * c / n_chunks, n * (c + 1) / n_chunks, t); });
    return;
  }
  const int parts = (int)std::min<int64_t>(n, n_threads_);
  const int64_t step = std::max<int64_t>(1, n / ((int64_t)parts * kStepsPerRange));
  for (int p = 0; p < parts; ++p)
    ranges_[p].lohi.store(pack_range((uint64_t)(n * p / parts), (uint64_t)(n * (p + 1) / parts)));
  for_each_task(parts, [&](int64_t p, int t) {
    int64_t b, e;
    while (take_front(ranges_[p], step, b, e)) fn(b, e, t);
    for (int k = 1; k < parts; ++k)
      while (take_back(ranges_[(p + k) % parts], step, b, e)) fn(b, e, t);
  });
}

}  // namespace spc
