// Slow tier (host and file stores), copy engine, RSS helper.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "tier/copy_engine.h"
#include "tier/rss.h"
#include "tier/slow_store.h"
#include "util/error.h"
#include "util/threadpool.h"

using namespace spc;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/specache-tier-XXXXXX";
    char* p = mkdtemp(tmpl);
    if (!p) throw std::runtime_error("mkdtemp failed");
    path = p;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  size_t n_entries() const {
    size_t n = 0;
    for (auto it = fs::directory_iterator(path); it != fs::directory_iterator(); ++it) ++n;
    return n;
  }
};

// Mounts a tmpfs (needs root and a sandbox that permits it); unmounts on destruction.
struct TmpfsMount {
  TempDir dir;
  bool ok = false;
  explicit TmpfsMount(const char* opts) { ok = ::mount("tmpfs", dir.path.c_str(), "tmpfs", 0, opts) == 0; }
  ~TmpfsMount() {
    if (ok) ::umount2(dir.path.c_str(), MNT_DETACH);
  }
};

enum class Kind { Host, FileUring, FilePread };
const char* kind_name(Kind k) { return k == Kind::Host ? "Host" : k == Kind::FileUring ? "FileUring" : "FilePread"; }

std::unique_ptr<SlowStore> make_store(Kind k, const SlowGeometry& g, const std::string& dir) {
  if (k == Kind::Host) return make_host_store(g);
  FileStoreOptions o;
  o.use_io_uring = (k == Kind::FileUring);
  return make_file_store(g, dir, o);
}

// Reference copy of what was written: shadow[(il*nh + h)*max_ctx + pos] row.
struct Shadow {
  SlowGeometry g;
  std::vector<uint8_t> data;
  explicit Shadow(const SlowGeometry& geo)
      : g(geo), data((size_t)geo.n_layer * geo.n_head_kv * geo.max_ctx * geo.row_bytes()) {}
  uint8_t* row(int il, int h, int64_t pos) {
    return data.data() + (((size_t)il * g.n_head_kv + h) * g.max_ctx + pos) * g.row_bytes();
  }
  // Writes random rows to both the store and the shadow.
  void write(SlowStore& s, int il, int64_t pos0, int64_t n, std::mt19937_64& rng) {
    const size_t rb = g.row_bytes();
    std::vector<uint8_t> buf((size_t)n * g.n_head_kv * rb);
    for (auto& b : buf) b = (uint8_t)rng();
    for (int64_t t = 0; t < n; ++t)
      for (int h = 0; h < g.n_head_kv; ++h)
        std::memcpy(row(il, h, pos0 + t), buf.data() + ((size_t)t * g.n_head_kv + h) * rb, rb);
    s.write_rows(il, pos0, n, buf.data());
  }
};

std::vector<RowRef> random_refs(const SlowStore& s, size_t n, std::mt19937_64& rng) {
  const SlowGeometry& g = s.geometry();
  std::vector<RowRef> refs;
  while (refs.size() < n) {
    const int il = (int)(rng() % g.n_layer);
    const int64_t w = s.written(il);
    if (w == 0) continue;
    const int h = (int)(rng() % g.n_head_kv);
    const int64_t pos = (int64_t)(rng() % (uint64_t)w);
    // Sometimes a short run of adjacent positions (exercises coalescing), sometimes a duplicate.
    const int run = (rng() % 4 == 0) ? 1 + (int)(rng() % 6) : 1;
    for (int r = 0; r < run && pos + r < w && refs.size() < n; ++r) refs.push_back({il, h, pos + r});
    if (rng() % 10 == 0 && refs.size() < n) refs.push_back(refs.back());
  }
  return refs;
}

void expect_rows_equal(Shadow& sh, const std::vector<RowRef>& refs, const std::vector<uint8_t>& got) {
  const size_t rb = sh.g.row_bytes();
  ASSERT_EQ(got.size(), refs.size() * rb);
  for (size_t i = 0; i < refs.size(); ++i) {
    ASSERT_EQ(std::memcmp(got.data() + i * rb, sh.row(refs[i].layer, refs[i].head, refs[i].pos), rb), 0)
        << "row " << i << " (layer " << refs[i].layer << " head " << refs[i].head << " pos " << refs[i].pos << ")";
  }
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no spc::Error thrown>";
}

}  // namespace

// ---------------------------------------------------------------------------------------------

class TierStore : public ::testing::TestWithParam<Kind> {};

TEST_P(TierStore, RoundTripRandomRows) {
  TempDir dir;
  SlowGeometry g{3, 2, 8, 1200};
  auto s = make_store(GetParam(), g, dir.path);
  EXPECT_STREQ(s->kind(), GetParam() == Kind::Host ? "host" : "file");
  if (GetParam() == Kind::FilePread) {
    EXPECT_STREQ(s->io_backend(), "pread");
  }
  std::printf("[ store %s: io backend %s ]\n", kind_name(GetParam()), s->io_backend());
  Shadow sh(g);
  std::mt19937_64 rng(42);
  const int64_t target[3] = {1100, 257, 0};  // layer 2 stays empty
  for (int il = 0; il < 3; ++il) {
    int64_t pos = 0;
    const int64_t sizes[] = {1, 7, 64, 1, 100, 33, 200, 3};
    for (int k = 0; pos < target[il]; ++k) {
      const int64_t n = std::min<int64_t>(sizes[k % 8], target[il] - pos);
      sh.write(*s, il, pos, n, rng);
      pos += n;
    }
    EXPECT_EQ(s->written(il), target[il]);
  }
  // Overwrite an already written range (allowed: no gap).
  sh.write(*s, 1, 10, 20, rng);
  EXPECT_EQ(s->written(1), 257);
  EXPECT_EQ(s->bytes_stored(), (size_t)(1100 + 257) * 2 * g.row_bytes());

  for (int rep = 0; rep < 20; ++rep) {
    const size_t n = 1 + rng() % 700;
    auto refs = random_refs(*s, n, rng);
    std::vector<uint8_t> got(refs.size() * g.row_bytes(), 0xAB);
    s->read_rows(refs.data(), refs.size(), got.data());
    expect_rows_equal(sh, refs, got);
  }
  // One long run of consecutive positions (longer than one vectored read), in order and reversed.
  std::vector<RowRef> run;
  for (int64_t p = 0; p < 1100; ++p) run.push_back({0, 1, p});
  std::vector<uint8_t> got(run.size() * g.row_bytes());
  s->read_rows(run.data(), run.size(), got.data());
  expect_rows_equal(sh, run, got);
  std::reverse(run.begin(), run.end());
  s->read_rows(run.data(), run.size(), got.data());
  expect_rows_equal(sh, run, got);

  // Scatter (RowRef::dst_row): rows land in the given slots of a larger buffer, others untouched.
  for (int rep = 0; rep < 10; ++rep) {
    auto refs = random_refs(*s, 1 + rng() % 300, rng);
    const size_t n_slots = 2 * refs.size() + 3, rb = g.row_bytes();
    std::vector<size_t> slots(n_slots);
    for (size_t i = 0; i < n_slots; ++i) slots[i] = i;
    std::shuffle(slots.begin(), slots.end(), rng);
    for (size_t i = 0; i < refs.size(); ++i) refs[i].dst_row = (int64_t)slots[i];
    std::vector<uint8_t> buf(n_slots * rb, 0xCD);
    s->read_rows(refs.data(), refs.size(), buf.data());
    std::vector<uint8_t> gathered(refs.size() * rb);
    for (size_t i = 0; i < refs.size(); ++i) std::memcpy(gathered.data() + i * rb, buf.data() + slots[i] * rb, rb);
    expect_rows_equal(sh, refs, gathered);
    for (size_t i = refs.size(); i < n_slots; ++i)
      for (size_t b = 0; b < rb; ++b) ASSERT_EQ(buf[slots[i] * rb + b], 0xCD) << "slot " << slots[i] << " was written";
  }

  // read_range.
  for (int rep = 0; rep < 20; ++rep) {
    const int il = (int)(rng() % 2), h = (int)(rng() % 2);
    const int64_t w = s->written(il);
    const int64_t p0 = (int64_t)(rng() % (uint64_t)w);
    const int64_t n = (int64_t)(rng() % (uint64_t)(w - p0 + 1));
    std::vector<uint8_t> buf((size_t)n * g.row_bytes());
    s->read_range(il, h, p0, n, buf.data());
    for (int64_t i = 0; i < n; ++i)
      ASSERT_EQ(std::memcmp(buf.data() + i * g.row_bytes(), sh.row(il, h, p0 + i), g.row_bytes()), 0);
  }
  s->read_rows(nullptr, 0, nullptr);  // empty batch is fine
}

TEST_P(TierStore, UnwrittenPositionsAndBadArgumentsThrow) {
  TempDir dir;
  SlowGeometry g{2, 2, 4, 100};
  auto s = make_store(GetParam(), g, dir.path);
  std::mt19937_64 rng(1);
  Shadow sh(g);
  sh.write(*s, 0, 0, 10, rng);
  std::vector<uint8_t> buf(64 * g.row_bytes());
  RowRef ok{0, 1, 9}, past{0, 1, 10}, other_layer{1, 0, 0}, bad_head{0, 2, 0}, bad_layer{2, 0, 0};
  s->read_rows(&ok, 1, buf.data());
  EXPECT_NE(error_of([&] { s->read_rows(&past, 1, buf.data()); }).find("never written"), std::string::npos);
  EXPECT_NE(error_of([&] { s->read_rows(&other_layer, 1, buf.data()); }).find("never written"), std::string::npos);
  EXPECT_NE(error_of([&] { s->read_rows(&bad_head, 1, buf.data()); }).find("head 2 out of range"), std::string::npos);
  EXPECT_NE(error_of([&] { s->read_rows(&bad_layer, 1, buf.data()); }).find("layer 2 out of range"),
            std::string::npos);
  EXPECT_NE(error_of([&] { s->read_range(0, 0, 5, 6, buf.data()); }).find("not all written"), std::string::npos);
  s->read_range(0, 0, 5, 5, buf.data());
  // Gaps and out-of-range writes.
  EXPECT_NE(error_of([&] { s->write_rows(0, 11, 1, buf.data()); }).find("gap"), std::string::npos);
  EXPECT_NE(error_of([&] { s->write_rows(0, 95, 6, buf.data()); }).find("max_ctx"), std::string::npos);
  EXPECT_THROW(make_store(GetParam(), SlowGeometry{0, 1, 1, 1}, dir.path), Error);
  EXPECT_THROW(make_store(GetParam(), SlowGeometry{-3, 1, 1, 1}, dir.path), Error);
  EXPECT_THROW(make_store(GetParam(), SlowGeometry{1 << 20, 1 << 20, 1 << 20, (int64_t)1 << 40}, dir.path), Error);
}

TEST_P(TierStore, ConcurrentReadersWithOneWriter) {
  TempDir dir;
  SlowGeometry g{2, 4, 16, 4000};
  auto s = make_store(GetParam(), g, dir.path);
  // Row content is a pure function of (layer, head, pos), so readers can check without the shadow.
  auto fill = [&](int il, int h, int64_t pos, uint8_t* row) {
    for (size_t b = 0; b < g.row_bytes(); ++b) row[b] = (uint8_t)(il * 131 + h * 31 + pos * 7 + b);
  };
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  // Two readers: on the io_uring store one of them finds the ring busy and takes the preadv path.
  auto read_loop = [&](uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<uint8_t> got(32 * g.row_bytes()), want(g.row_bytes());
    while (!stop.load()) {
      std::vector<RowRef> refs;
      for (int i = 0; i < 32; ++i) {
        const int il = (int)(rng() % 2);
        const int64_t w = s->written(il);
        if (w == 0) continue;
        refs.push_back({il, (int)(rng() % 4), (int64_t)(rng() % (uint64_t)w)});
      }
      s->read_rows(refs.data(), refs.size(), got.data());
      for (size_t i = 0; i < refs.size(); ++i) {
        fill(refs[i].layer, refs[i].head, refs[i].pos, want.data());
        if (std::memcmp(got.data() + i * g.row_bytes(), want.data(), g.row_bytes()) != 0) failures++;
      }
    }
  };
  std::thread reader1(read_loop, 5), reader2(read_loop, 6);
  std::vector<uint8_t> buf(16 * 4 * g.row_bytes());
  for (int64_t pos = 0; pos < 4000; pos += 16)
    for (int il = 0; il < 2; ++il) {
      for (int t = 0; t < 16; ++t)
        for (int h = 0; h < 4; ++h) fill(il, h, pos + t, buf.data() + ((size_t)t * 4 + h) * g.row_bytes());
      s->write_rows(il, pos, 16, buf.data());
    }
  stop = true;
  reader1.join();
  reader2.join();
  EXPECT_EQ(failures.load(), 0);
}

// A store sharing the first positions of another (SlowStore::share_prefix): reads below them come
// from the base, the others from its own rows, also in one batch and one range across the border;
// its own bytes and high-water marks start there; the base may be dropped by its first owner.
TEST_P(TierStore, SharedPrefixReadsTheBase) {
  TempDir dir;
  SlowGeometry g{2, 2, 8, 600};
  std::shared_ptr<SlowStore> base = make_store(GetParam(), g, dir.path);
  Shadow sh(g);
  std::mt19937_64 rng(5);
  for (int il = 0; il < 2; ++il) sh.write(*base, il, 0, 300, rng);
  auto s = make_store(GetParam(), g, dir.path);
  EXPECT_THROW(s->share_prefix(base, 301), Error);  // more than the base holds
  EXPECT_THROW(s->share_prefix(make_store(GetParam(), SlowGeometry{2, 2, 4, 600}, dir.path), 10), Error);
  s->share_prefix(base, 200);
  EXPECT_EQ(s->shared_positions(), 200);
  EXPECT_EQ(s->written(0), 200);
  EXPECT_EQ(s->bytes_stored(), 0u);
  EXPECT_THROW(s->share_prefix(base, 100), Error);  // only into an empty store
  // Its own rows from 200 on: the shadow's rows 200.. become this store's; the base keeps its own.
  Shadow mine = sh;
  for (int il = 0; il < 2; ++il) mine.write(*s, il, 200, 150, rng);
  Shadow scratch = mine;
  EXPECT_THROW(scratch.write(*s, 0, 150, 10, rng), Error);  // the shared part is read-only
  EXPECT_EQ(s->written(1), 350);
  EXPECT_EQ(s->bytes_stored(), (size_t)2 * 150 * 2 * g.row_bytes());
  base->write_rows(0, 300, 0, nullptr);  // (the base's owner goes on writing past the prefix)
  sh.write(*base, 0, 300, 50, rng);
  base.reset();  // s keeps it alive
  const auto refs = random_refs(*s, 500, rng);
  std::vector<uint8_t> got(refs.size() * g.row_bytes());
  s->read_rows(refs.data(), refs.size(), got.data());
  expect_rows_equal(mine, refs, got);
  size_t below = 0;
  for (const RowRef& r : refs) below += r.pos < 200;
  EXPECT_GT(below, 100u);
  EXPECT_LT(below, 450u);
  std::vector<uint8_t> range(100 * g.row_bytes());
  s->read_range(1, 1, 150, 100, range.data());
  EXPECT_EQ(std::memcmp(range.data(), mine.row(1, 1, 150), range.size()), 0);
  // Scatter into slots (dst_row) across the border.
  std::vector<RowRef> slots = {{0, 1, 10, 3}, {0, 0, 250, 0}, {1, 1, 199, 2}, {1, 0, 200, 1}};
  std::vector<uint8_t> dst(4 * g.row_bytes());
  s->read_rows(slots.data(), slots.size(), dst.data());
  for (const RowRef& r : slots)
    EXPECT_EQ(std::memcmp(dst.data() + r.dst_row * g.row_bytes(), mine.row(r.layer, r.head, r.pos), g.row_bytes()), 0);
  RowRef beyond{0, 0, 350, -1};
  EXPECT_THROW(s->read_rows(&beyond, 1, dst.data()), Error);
}

INSTANTIATE_TEST_SUITE_P(Tier, TierStore, ::testing::Values(Kind::Host, Kind::FileUring, Kind::FilePread),
                         [](const auto& info) { return std::string(kind_name(info.param)); });

// ---------------------------------------------------------------------------------------------

TEST(TierFile, ReportsIoBackend) {
  TempDir dir;
  auto s = make_file_store(SlowGeometry{1, 1, 4, 16}, dir.path);
  std::printf("[ file store I/O path in this environment: %s ]\n", s->io_backend());
  EXPECT_TRUE(std::strcmp(s->io_backend(), "io_uring") == 0 || std::strcmp(s->io_backend(), "pread") == 0);
}

TEST(TierFile, EnvironmentCanForcePread) {
  TempDir dir;
  const char* old = std::getenv("SPECACHE_NO_URING");
  const std::string saved = old ? old : "";
  ::setenv("SPECACHE_NO_URING", "1", 1);
  auto s = make_file_store(SlowGeometry{1, 1, 4, 16}, dir.path);
  if (old) ::setenv("SPECACHE_NO_URING", saved.c_str(), 1); else ::unsetenv("SPECACHE_NO_URING");
  EXPECT_STREQ(s->io_backend(), "pread");
}

TEST(TierFile, GatherTimingReport) {
  // Not a benchmark gate: prints the cost of one decode-sized gather (512 random rows of 512 bytes).
  TempDir dir;
  SlowGeometry g{2, 8, 128, 8192};
  std::vector<uint8_t> buf(256 * 8 * g.row_bytes(), 1);
  for (Kind k : {Kind::Host, Kind::FileUring, Kind::FilePread}) {
    auto s = make_store(k, g, dir.path);
    for (int il = 0; il < 2; ++il)
      for (int64_t p = 0; p < 8192; p += 256) s->write_rows(il, p, 256, buf.data());
    std::mt19937_64 rng(3);
    std::vector<RowRef> refs(512);
    std::vector<uint8_t> out(512 * g.row_bytes());
    const int reps = 50;
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) {
      for (auto& ref : refs) ref = {(int)(rng() % 2), (int)(rng() % 8), (int64_t)(rng() % 8192)};
      s->read_rows(refs.data(), refs.size(), out.data());
    }
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / reps;
    std::printf("[ %-9s (%s): %.1f us per 512-row gather (page cache warm) ]\n", kind_name(k), s->io_backend(), us);
  }
}

TEST(TierFile, LeavesNoFileBehind) {
  TempDir dir;
  {
    auto s = make_file_store(SlowGeometry{2, 2, 8, 64}, dir.path);
    std::vector<uint8_t> buf(10 * 2 * 32, 7);
    s->write_rows(0, 0, 10, buf.data());
    EXPECT_EQ(dir.n_entries(), 0u);  // anonymous while alive, too
  }
  EXPECT_EQ(dir.n_entries(), 0u);
}

TEST(TierFile, MissingDirectoryThrows) {
  TempDir dir;
  const std::string missing = dir.path + "/does/not/exist";
  const std::string msg = error_of([&] { make_file_store(SlowGeometry{1, 1, 4, 16}, missing); });
  EXPECT_NE(msg.find(missing), std::string::npos) << msg;
  EXPECT_NE(msg.find(std::strerror(ENOENT)), std::string::npos) << msg;
}

TEST(TierFile, RegularFileAsDirectoryThrows) {
  TempDir dir;
  const std::string file = dir.path + "/plain";
  { std::FILE* f = std::fopen(file.c_str(), "w"); ASSERT_NE(f, nullptr); std::fclose(f); }
  std::string msg = error_of([&] { make_file_store(SlowGeometry{1, 1, 4, 16}, file); });
  EXPECT_NE(msg.find(file), std::string::npos) << msg;
  EXPECT_NE(msg.find("not a directory"), std::string::npos) << msg;
  // A path under a regular file.
  msg = error_of([&] { make_file_store(SlowGeometry{1, 1, 4, 16}, file + "/sub"); });
  EXPECT_NE(msg.find(file + "/sub"), std::string::npos) << msg;
  EXPECT_NE(msg.find(std::strerror(ENOTDIR)), std::string::npos) << msg;
}

TEST(TierFile, ReadOnlyDirectoryThrows) {
  // Root ignores permission bits, so use a read-only tmpfs when mounting is permitted.
  TmpfsMount m("size=64k");
  if (!m.ok) GTEST_SKIP() << "cannot mount tmpfs here (" << std::strerror(errno) << ")";
  ASSERT_EQ(::mount(nullptr, m.dir.path.c_str(), nullptr, MS_REMOUNT | MS_RDONLY, nullptr), 0) << std::strerror(errno);
  const std::string msg = error_of([&] { make_file_store(SlowGeometry{1, 1, 4, 16}, m.dir.path); });
  EXPECT_NE(msg.find(m.dir.path), std::string::npos) << msg;
  EXPECT_NE(msg.find(std::strerror(EROFS)), std::string::npos) << msg;
}

TEST(TierFile, DiskFullOnTmpfsThrows) {
  TmpfsMount m("size=64k");
  if (!m.ok) GTEST_SKIP() << "cannot mount tmpfs here (" << std::strerror(errno) << "); see FileSizeLimitThrows";
  SlowGeometry g{1, 2, 64, 4096};  // 256-byte rows, 2 MiB of layout in a 64 KiB filesystem
  auto s = make_file_store(g, m.dir.path);
  std::vector<uint8_t> buf(64 * 2 * g.row_bytes(), 3);
  std::string msg;
  int64_t pos = 0;
  for (; pos < 4096; pos += 64) {
    msg = error_of([&] { s->write_rows(0, pos, 64, buf.data()); });
    if (msg != "<no spc::Error thrown>") break;
  }
  EXPECT_LT(pos, 4096);
  EXPECT_NE(msg.find(std::strerror(ENOSPC)), std::string::npos) << msg;
  EXPECT_NE(msg.find(m.dir.path), std::string::npos) << msg;
  EXPECT_EQ(s->written(0), pos);  // the failed batch is not counted as written
}

TEST(TierFile, FileSizeLimitThrows) {
  // Simulated disk full that needs no mount: RLIMIT_FSIZE with SIGXFSZ ignored makes writes fail with EFBIG.
  TempDir dir;
  SlowGeometry g{2, 2, 16, 1024};  // layer 1 starts at 2*1024*64 = 128 KiB
  auto s = make_file_store(g, dir.path);
  std::vector<uint8_t> buf(8 * 2 * g.row_bytes(), 9);
  s->write_rows(0, 0, 8, buf.data());
  struct rlimit old;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit lim = old;
  lim.rlim_cur = 64 * 1024;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &lim), 0);
  const std::string msg = error_of([&] { s->write_rows(1, 0, 8, buf.data()); });
  setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_NE(msg.find(std::strerror(EFBIG)), std::string::npos) << msg;
  EXPECT_NE(msg.find(dir.path), std::string::npos) << msg;
  EXPECT_EQ(s->written(1), 0);
  s->write_rows(1, 0, 8, buf.data());  // works again once the limit is lifted
  EXPECT_EQ(s->written(1), 8);
}

TEST(TierFile, TruncatedUnderneathGivesShortReadError) {
  for (bool uring : {true, false}) {
    TempDir dir;
    SlowGeometry g{1, 1, 8, 256};
    FileStoreOptions o;
    o.use_io_uring = uring;
    auto s = make_file_store(g, dir.path, o);
    std::vector<uint8_t> buf(100 * g.row_bytes(), 1);
    s->write_rows(0, 0, 100, buf.data());
    // Find our anonymous file among the open descriptors and truncate it.
    int victim = -1;
    for (const auto& e : fs::directory_iterator("/proc/self/fd")) {
      std::error_code ec;
      const std::string target = fs::read_symlink(e.path(), ec).string();
      if (!ec && target.rfind(dir.path + "/", 0) == 0) victim = std::stoi(e.path().filename().string());
    }
    ASSERT_GE(victim, 0);
    ASSERT_EQ(::ftruncate(victim, 50 * (off_t)g.row_bytes()), 0);
    RowRef refs[2] = {{0, 0, 10}, {0, 0, 60}};
    std::vector<uint8_t> out(20 * g.row_bytes());
    std::string msg = error_of([&] { s->read_rows(refs, 2, out.data()); });
    EXPECT_NE(msg.find("short read"), std::string::npos) << (uring ? "io_uring: " : "pread: ") << msg;
    EXPECT_NE(msg.find(dir.path), std::string::npos) << msg;
    msg = error_of([&] { s->read_range(0, 0, 40, 20, out.data()); });
    EXPECT_NE(msg.find("short read"), std::string::npos) << msg;
    s->read_rows(refs, 1, out.data());  // rows still present read fine
  }
}

TEST(TierFile, DataDoesNotLiveInProcessMemory) {
  TempDir dir;
  SlowGeometry g{4, 4, 64, 8192};  // 256-byte rows, 32 MiB of layout
  auto s = make_file_store(g, dir.path);
  std::vector<uint8_t> buf(256 * 4 * g.row_bytes(), 5);
  const size_t before = current_rss_bytes();
  for (int il = 0; il < 4; ++il)
    for (int64_t pos = 0; pos < 8192; pos += 256) s->write_rows(il, pos, 256, buf.data());
  const size_t after = current_rss_bytes();
  EXPECT_EQ(s->bytes_stored(), (size_t)32 << 20);
  EXPECT_LT(after, before + ((size_t)8 << 20)) << "RSS grew by " << (after - before) << " bytes";
}

TEST(TierHost, LargeGeometryCostsNothingUntilWritten) {
  SlowGeometry g{30, 8, 128, 32768};  // 3.75 GiB of layout
  const size_t before = current_rss_bytes();
  auto s = make_host_store(g);
  EXPECT_LT(current_rss_bytes(), before + ((size_t)8 << 20));
  std::vector<uint8_t> buf(8 * g.row_bytes(), 1);
  s->write_rows(29, 0, 1, buf.data());
  EXPECT_EQ(s->bytes_stored(), 8 * g.row_bytes());
  EXPECT_LT(current_rss_bytes(), before + ((size_t)8 << 20));
}

// ---------------------------------------------------------------------------------------------

namespace {
// Wraps a store and counts read_rows calls (checks that the engine batches).
class CountingStore : public SlowStore {
 public:
  explicit CountingStore(SlowStore& inner) : SlowStore(inner.geometry()), inner_(inner) {}
  const char* kind() const override { return inner_.kind(); }
  const char* io_backend() const override { return inner_.io_backend(); }
  void write_rows(int il, int64_t pos0, int64_t n, const void* rows) override { inner_.write_rows(il, pos0, n, rows); }
  void read_rows(const RowRef* refs, size_t n, void* dst) override {
    calls++;
    inner_.read_rows(refs, n, dst);
  }
  void read_range(int il, int head, int64_t pos0, int64_t n, void* dst) override {
    inner_.read_range(il, head, pos0, n, dst);
  }
  size_t bytes_stored() const override { return inner_.bytes_stored(); }
  int64_t written(int il) const override { return inner_.written(il); }
  std::atomic<uint64_t> calls{0};

 private:
  SlowStore& inner_;
};

struct EngineFixture {
  TempDir dir;
  SlowGeometry g{4, 2, 16, 2048};
  std::unique_ptr<SlowStore> store;
  Shadow sh{g};
  explicit EngineFixture(Kind k) : store(make_store(k, g, dir.path)) {
    std::mt19937_64 rng(11);
    for (int il = 0; il < 4; ++il) sh.write(*store, il, 0, 1000 + il * 100, rng);
  }
};

// Submits n_tickets gathers, waits for them in a mixed order, returns all destination bytes.
// pool: run the copies on its idle workers instead of the engine's thread.
std::vector<std::vector<uint8_t>> run_gathers(SlowStore& store, int n_tickets, uint32_t delay_us,
                                              std::vector<std::vector<RowRef>>* refs_out, ThreadPool* pool = nullptr) {
  CopyEngine eng(store);
  eng.run_on(pool);
  eng.inject_delays(delay_us, 1234);
  std::mt19937_64 rng(77);
  std::vector<std::vector<uint8_t>> dst(n_tickets);
  std::vector<std::vector<RowRef>> refs(n_tickets);
  std::vector<CopyEngine::Ticket> tickets;
  for (int i = 0; i < n_tickets; ++i) {
    refs[i] = random_refs(store, 1 + rng() % 128, rng);
    dst[i].assign(refs[i].size() * store.geometry().row_bytes(), 0);
    tickets.push_back(eng.submit_gather(refs[i], dst[i].data()));
    if (i % 7 == 3) eng.wait(tickets[(size_t)i / 2]);
  }
  for (int i = n_tickets - 1; i >= 0; --i) eng.wait(tickets[i]);
  for (auto t : tickets) EXPECT_TRUE(eng.done(t));
  if (refs_out) *refs_out = refs;
  return dst;
}
}  // namespace

TEST(TierCopy, InjectedDelaysGiveIdenticalBytes) {
  for (Kind k : {Kind::Host, Kind::FileUring}) {
    EngineFixture f(k);
    std::vector<std::vector<RowRef>> refs;
    auto a = run_gathers(*f.store, 120, 0, &refs);
    auto b = run_gathers(*f.store, 120, 300, nullptr);
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      ASSERT_EQ(a[i], b[i]) << "ticket " << i;
      expect_rows_equal(f.sh, refs[i], a[i]);
    }
  }
}

TEST(TierCopy, PoolWorkersRunTheCopiesWithIdenticalBytes) {
  ThreadPool pool(3);
  for (Kind k : {Kind::Host, Kind::FileUring}) {
    EngineFixture f(k);
    std::vector<std::vector<RowRef>> refs;
    auto a = run_gathers(*f.store, 120, 0, &refs);
    auto b = run_gathers(*f.store, 120, 0, nullptr, &pool);
    auto c = run_gathers(*f.store, 120, 300, nullptr, &pool);
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      ASSERT_EQ(a[i], b[i]) << "ticket " << i;
      ASSERT_EQ(a[i], c[i]) << "ticket " << i;
    }
  }
  // The idle workers copy without anyone waiting: the ticket completes on its own.
  EngineFixture f(Kind::Host);
  CopyEngine eng(*f.store);
  eng.run_on(&pool);
  std::mt19937_64 rng(5);
  const auto refs = random_refs(*f.store, 64, rng);
  std::vector<uint8_t> d(refs.size() * f.g.row_bytes(), 0);
  const auto t = eng.submit_gather(refs, d.data());
  for (int i = 0; i < 20000 && !eng.done(t); ++i) std::this_thread::sleep_for(std::chrono::microseconds(100));
  EXPECT_TRUE(eng.done(t));
  EXPECT_EQ(eng.stats().stall_ms, 0.0);
  eng.wait(t);
  expect_rows_equal(f.sh, refs, d);
  ThreadPool single(1);
  EXPECT_THROW(eng.run_on(&single), Error);
}

TEST(TierCopy, WaitRunsBatchesNoExecutorStarted) {
  // Workers kept busy by a long job: the waiter copies its own batches (and earlier ones, in order).
  ThreadPool pool(2);
  EngineFixture f(Kind::Host);
  std::atomic<bool> release{false};
  pool.post_background([&] {
    while (!release.load()) std::this_thread::sleep_for(std::chrono::microseconds(50));
  });
  CopyEngine eng(*f.store);
  eng.run_on(&pool);
  std::mt19937_64 rng(6);
  std::vector<std::vector<RowRef>> refs(3);
  std::vector<std::vector<uint8_t>> d(3);
  std::vector<CopyEngine::Ticket> ts;
  for (int i = 0; i < 3; ++i) {
    refs[i] = random_refs(*f.store, 32, rng);
    d[i].assign(refs[i].size() * f.g.row_bytes(), 0);
    ts.push_back(eng.submit_gather(refs[i], d[i].data()));
  }
  eng.wait(ts[1]);
  EXPECT_TRUE(eng.done(ts[0]));
  EXPECT_TRUE(eng.done(ts[1]));
  EXPECT_FALSE(eng.done(ts[2]));
  expect_rows_equal(f.sh, refs[0], d[0]);
  expect_rows_equal(f.sh, refs[1], d[1]);
  EXPECT_EQ(eng.stats().batches, 2u);
  release.store(true);
  eng.wait(ts[2]);
  expect_rows_equal(f.sh, refs[2], d[2]);
}

TEST(TierCopy, StatsCountBytesRowsBatchesAndOneStoreCallPerBatch) {
  EngineFixture f(Kind::Host);
  CountingStore cs(*f.store);
  CopyEngine eng(cs);
  const size_t rb = f.g.row_bytes();
  std::vector<RowRef> refs;
  for (int i = 0; i < 64; ++i) refs.push_back({i % 4, i % 2, i * 3});
  std::vector<uint8_t> d1(64 * rb), d2(64 * rb), d3(64 * rb);
  auto t1 = eng.submit_gather(refs, d1.data());
  auto t2 = eng.submit_gather(refs, d2.data());
  eng.wait(t2);
  EXPECT_TRUE(eng.done(t1));
  eng.gather_now(refs.data(), refs.size(), d3.data());
  EXPECT_EQ(d1, d3);
  EXPECT_EQ(d2, d3);
  expect_rows_equal(f.sh, refs, d3);
  auto st = eng.stats();
  EXPECT_EQ(st.batches, 3u);
  EXPECT_EQ(st.rows, 3u * 64);
  EXPECT_EQ(st.bytes, 3u * 64 * rb);
  EXPECT_EQ(cs.calls.load(), 3u);
  EXPECT_GE(st.copy_ms, 0.0);
  EXPECT_GE(st.stall_ms, 0.0);
  eng.reset_stats();
  st = eng.stats();
  EXPECT_EQ(st.batches, 0u);
  EXPECT_EQ(st.bytes, 0u);
  EXPECT_EQ(st.copy_ms, 0.0);
  // Stall time grows when waiting on a slow copy.
  eng.inject_delays(20000, 3);
  std::vector<CopyEngine::Ticket> ts;
  for (int i = 0; i < 4; ++i) ts.push_back(eng.submit_gather(refs, d1.data()));
  eng.wait(ts.back());
  st = eng.stats();
  EXPECT_EQ(st.batches, 4u);
  EXPECT_GT(st.stall_ms, 0.0);
  EXPECT_GE(st.copy_ms, st.stall_ms * 0.5);
}

TEST(TierCopy, WaitRethrowsCopyErrors) {
  EngineFixture f(Kind::FileUring);
  CopyEngine eng(*f.store);
  const size_t rb = f.g.row_bytes();
  // One destination per ticket: the engine does not order the writes of different tickets into
  // one buffer (io_uring completes the reads of overlapping batches in any order), and with a
  // shared buffer the bad batch's good first row could land after good2's.
  std::vector<uint8_t> d(4 * rb), d1(2 * rb), db(2 * rb), d2(rb);
  auto good1 = eng.submit_gather({{0, 0, 1}, {0, 1, 2}}, d1.data());
  auto bad = eng.submit_gather({{0, 0, 1}, {1, 0, 5000}}, db.data());  // never written
  auto good2 = eng.submit_gather({{3, 1, 1299}}, d2.data());
  eng.wait(good1);
  EXPECT_NE(error_of([&] { eng.wait(bad); }).find("never written"), std::string::npos);
  EXPECT_THROW(eng.wait(bad), Error);  // every wait on it reports the error
  EXPECT_TRUE(eng.done(bad));
  eng.wait(good2);
  EXPECT_EQ(std::memcmp(d1.data(), f.sh.row(0, 0, 1), rb), 0);
  EXPECT_EQ(std::memcmp(d1.data() + rb, f.sh.row(0, 1, 2), rb), 0);
  EXPECT_EQ(std::memcmp(d2.data(), f.sh.row(3, 1, 1299), rb), 0);
  RowRef badref{2, 0, 1200};
  EXPECT_THROW(eng.gather_now(&badref, 1, d.data()), Error);
  EXPECT_THROW(eng.wait(999), Error);  // unknown ticket
  EXPECT_EQ(eng.stats().rows, 3u);
}

TEST(TierCopy, DestructionWithPendingWorkDrains) {
  EngineFixture f(Kind::Host);
  const size_t rb = f.g.row_bytes();
  std::mt19937_64 rng(9);
  std::vector<std::vector<uint8_t>> dst(50);
  std::vector<std::vector<RowRef>> refs(50);
  {
    CopyEngine eng(*f.store);
    eng.inject_delays(2000, 8);
    for (int i = 0; i < 50; ++i) {
      refs[i] = random_refs(*f.store, 16, rng);
      dst[i].assign(refs[i].size() * rb, 0);
      eng.submit_gather(refs[i], dst[i].data());
    }
    // Includes a failing batch: its error is dropped silently at destruction.
    eng.submit_gather({{0, 0, 100000}}, dst[0].data());
  }
  for (int i = 0; i < 50; ++i) expect_rows_equal(f.sh, refs[i], dst[i]);
  { CopyEngine idle(*f.store); }  // construct/destroy with nothing queued
  // The same with the copies on a pool's workers: the engine finishes its own queue; the jobs it
  // posted and the pool runs later find nothing to do.
  ThreadPool pool(2);
  std::atomic<bool> release{false};
  pool.post_background([&] {
    while (!release.load()) std::this_thread::sleep_for(std::chrono::microseconds(50));
  });
  for (auto& x : dst) std::fill(x.begin(), x.end(), 0);
  {
    CopyEngine eng(*f.store);
    eng.run_on(&pool);
    for (int i = 0; i < 50; ++i) eng.submit_gather(refs[i], dst[i].data());
  }
  release.store(true);
  for (int i = 0; i < 50; ++i) expect_rows_equal(f.sh, refs[i], dst[i]);
}

TEST(ThreadPoolBackground, JobsRunOnIdleOrSleepingWorkersAndAtDestruction) {
  std::atomic<int> ran{0};
  {
    ThreadPool pool(2);
    // Spinning workers (right after a job) and sleeping ones (after a pause) both pick jobs up.
    pool.for_each_task(4, [](int64_t, int) {});
    pool.post_background([&] { ran.fetch_add(1); });
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    pool.post_background([&] { ran.fetch_add(1); });
    for (int i = 0; i < 20000 && ran.load() < 2; ++i) std::this_thread::sleep_for(std::chrono::microseconds(100));
    EXPECT_EQ(ran.load(), 2);
    // Jobs in posting order, interleaved with parallel work.
    std::vector<int> order;
    std::mutex mu;
    for (int i = 0; i < 100; ++i) {
      pool.post_background([&, i] {
        std::lock_guard<std::mutex> lock(mu);
        order.push_back(i);
      });
      if (i % 10 == 0) pool.for_each_task(8, [](int64_t, int) {});
    }
    for (int i = 0; i < 20000; ++i) {
      {
        std::lock_guard<std::mutex> lock(mu);
        if (order.size() == 100) break;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    std::lock_guard<std::mutex> lock(mu);
    ASSERT_EQ(order.size(), 100u);
    for (int i = 0; i < 100; ++i) EXPECT_EQ(order[i], i);
  }
  {
    // Queued behind a job that holds the only worker until the pool is destroyed: the destructor runs them.
    std::atomic<bool> release{false};
    ran.store(0);
    auto pool = std::make_unique<ThreadPool>(2);
    pool->post_background([&] {
      while (!release.load()) std::this_thread::sleep_for(std::chrono::microseconds(50));
    });
    for (int i = 0; i < 5; ++i) pool->post_background([&] { ran.fetch_add(1); });
    std::thread releaser([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      release.store(true);
    });
    pool.reset();
    releaser.join();
    EXPECT_EQ(ran.load(), 5);
  }
  ThreadPool single(1);
  EXPECT_THROW(single.post_background([] {}), Error);
}

// ---------------------------------------------------------------------------------------------

TEST(TierRss, TouchingMemoryRaisesRss) {
  const size_t before = current_rss_bytes();
  const size_t n = (size_t)64 << 20;
  char* p = static_cast<char*>(std::malloc(n));
  ASSERT_NE(p, nullptr);
  for (size_t i = 0; i < n; i += 4096) p[i] = (char)i;
  const size_t during = current_rss_bytes();
  EXPECT_GE(during, before + ((size_t)56 << 20)) << "before " << before << " during " << during;
  EXPECT_GE(peak_rss_bytes(), during);
  volatile char sink = p[n / 2];
  (void)sink;
  std::free(p);
}
