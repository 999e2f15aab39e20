// ThreadPool: parallel_for covers [0, n) exactly once with contiguous pieces, each thread's pieces
// continuing one another while it works through its own share, and steals keep the balance when
// a thread is held up; for_each_task runs every task once.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <vector>

#include "util/threadpool.h"

using namespace spc;

namespace {

struct Piece {
  int64_t b, e;
  int thread;
};

// Runs parallel_for(n) and returns the pieces it handed out, in the order each thread ran them.
std::vector<std::vector<Piece>> pieces_of(ThreadPool& pool, int64_t n, int slow_thread = -1) {
  std::mutex mu;
  std::vector<std::vector<Piece>> by_thread(pool.size());
  pool.parallel_for(n, [&](int64_t b, int64_t e, int t) {
    if (t == slow_thread) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    std::lock_guard<std::mutex> lock(mu);
    by_thread[t].push_back({b, e, t});
  });
  return by_thread;
}

void expect_exact_cover(const std::vector<std::vector<Piece>>& by_thread, int64_t n) {
  std::vector<int> hits((size_t)n, 0);
  for (const auto& v : by_thread)
    for (const Piece& p : v) {
      ASSERT_LT(p.b, p.e) << "empty piece";
      ASSERT_GE(p.b, 0);
      ASSERT_LE(p.e, n);
      for (int64_t i = p.b; i < p.e; ++i) ++hits[(size_t)i];
    }
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[(size_t)i], 1) << "item " << i << " of " << n;
}

}  // namespace

TEST(ThreadPool, ParallelForCoversEveryItemOnce) {
  for (int threads : {1, 2, 3, 4}) {
    ThreadPool pool(threads);
    for (int64_t n : {1, 2, 3, 5, 16, 17, 31, 144, 1000, 4099}) {
      SCOPED_TRACE(testing::Message() << threads << " threads, n = " << n);
      expect_exact_cover(pieces_of(pool, n), n);
    }
  }
}

TEST(ThreadPool, ParallelForOneThreadIsOnePiece) {
  ThreadPool pool(1);
  const auto by_thread = pieces_of(pool, 1000);
  ASSERT_EQ(by_thread[0].size(), 1u);
  EXPECT_EQ(by_thread[0][0].b, 0);
  EXPECT_EQ(by_thread[0][0].e, 1000);
}

// With two threads a thread's pieces form at most two contiguous runs: its own share front to
// back (each piece starting where the previous one ended), then, if it finishes first, the
// other share's back, back to front (each piece ending where the previous one began).
TEST(ThreadPool, ParallelForPiecesOfAThreadAreContiguous) {
  ThreadPool pool(2);
  const int64_t n = 1024;
  for (int rep = 0; rep < 20; ++rep) {
    const auto by_thread = pieces_of(pool, n);
    expect_exact_cover(by_thread, n);
    for (const auto& v : by_thread) {
      size_t i = 1;
      while (i < v.size() && v[i].b == v[i - 1].e) ++i;  // the run through its own share
      if (i < v.size()) ++i;                             // the first stolen piece
      for (; i < v.size(); ++i)
        EXPECT_EQ(v[i].e, v[i - 1].b) << "piece [" << v[i].b << ", " << v[i].e << ") after [" << v[i - 1].b << ", "
                                      << v[i - 1].e << ") breaks the stolen run";
    }
  }
}

// With one thread held up at every piece, the other takes over most of its share from the back:
// the work still completes exactly once, and the fast thread ends up with more than half.
TEST(ThreadPool, ParallelForStealsFromASlowThread) {
  ThreadPool pool(2);
  const int64_t n = 640;
  for (int slow : {0, 1}) {
    const auto by_thread = pieces_of(pool, n, slow);
    expect_exact_cover(by_thread, n);
    int64_t fast_items = 0;
    for (const Piece& p : by_thread[1 - slow]) fast_items += p.e - p.b;
    // The slow thread spends 2 ms per piece (of n/32 items); the fast one takes the rest in
    // microseconds. If the worker (thread 1) has not started yet, thread 0 does everything.
    EXPECT_GT(fast_items, n / 2) << "slow thread " << slow;
  }
}

TEST(ThreadPool, ForEachTaskRunsEveryTaskOnce) {
  ThreadPool pool(2);
  for (int64_t n : {1, 2, 7, 100}) {
    std::vector<std::atomic<int>> hits((size_t)n);
    for (auto& h : hits) h.store(0);
    pool.for_each_task(n, [&](int64_t task, int t) {
      ASSERT_GE(t, 0);
      ASSERT_LT(t, pool.size());
      hits[(size_t)task].fetch_add(1);
    });
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(hits[(size_t)i].load(), 1) << "task " << i;
  }
}
