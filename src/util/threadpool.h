// Fixed-size thread pool for data-parallel loops. The calling thread takes part as worker 0.
// Work is split into tasks claimed from a shared counter, so a worker that is slow to wake (a
// busy machine) never stalls the caller: whoever is running takes the remaining tasks. Workers
// spin briefly between jobs (decode issues hundreds of small jobs per token), then sleep.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
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

  // Splits [0, n) into contiguous chunks (a few per thread): fn(begin, end, thread_index).
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn);

 private:
  void worker_loop(int index);
  void work(int index);

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
};

}  // namespace spc
