// Fixed-size thread pool for data-parallel loops. The calling thread takes part as worker 0.
// Work is split into tasks claimed from a shared counter, so a worker that is slow to wake (a
// busy machine) never stalls the caller: whoever is running takes the remaining tasks. Workers
// spin briefly between jobs (decode issues hundreds of small jobs per token), then sleep.
// Background work (post_background) runs on workers while they wait for the next job: on a machine
// whose cores are all in the pool, that is where a copy can run without preempting the compute.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace spc {

class ThreadPool {
 public:
  // n_threads >= 1 (the caller counts as one).
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Runs fn(task, thread_index) once for every task in [0, n_tasks), spread over the threads;
  // thread_index < size() identifies per-thread scratch. Returns when all tasks are done.
  void for_each_task(int64_t n_tasks, const std::function<void(int64_t, int)>& fn);

  // Runs fn(begin, end, thread_index) over disjoint contiguous pieces covering [0, n): each
  // thread works through its own contiguous share front to back, in steps, and when it is done
  // takes steps from the back of the others' shares (see threadpool.cpp).
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn);

  // Queues fn to run once on a worker thread that is waiting for work (between jobs, or woken
  // for it if asleep), without a system call when the workers are spinning. Returns at once;
  // jobs start in posting order (with several workers they may overlap), and fn must not throw.
  // Needs a worker (size() > 1). Jobs still queued when the pool is destroyed are run by the
  // destructor, so whoever posts them never waits on a job that was dropped.
  void post_background(std::function<void()> fn);

  // parallel_for's per-thread share: a contiguous range of items [lo, hi) packed into one word,
  // so that its owner (taking steps from the front) and thieves (taking them from the back) claim
  // disjoint parts with one CAS.
  struct alignas(64) StealRange {
    std::atomic<uint64_t> lohi{0};
  };

 private:
  void worker_loop(int index);
  void work(int index);
  bool run_background();  // runs one queued background job; false if there was none

  int n_threads_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int)>* job_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_{0};     // next task to claim
  std::atomic<int64_t> done_{0};     // tasks finished
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> closed_{0};  // last generation whose tasks are all done
  std::atomic<int> active_{0};       // workers inside work()
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::mutex bg_mu_;
  std::deque<std::function<void()>> bg_;  // background jobs (post_background)
  std::atomic<int64_t> bg_queued_{0};     // bg_.size(), read without the lock by spinning workers
  std::atomic<int> sleeping_{0};          // workers blocked on cv_
  std::vector<StealRange> ranges_;        // parallel_for (one job at a time, like job_)
};

}  // namespace spc
