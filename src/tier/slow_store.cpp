#include "tier/slow_store.h"

#include <fcntl.h>
#include <liburing.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "util/env.h"
#include "util/error.h"
#include "util/prefetch.h"

namespace spc {

SlowStore::~SlowStore() = default;

void SlowStore::start_at(int64_t) { throw Error(strfmt("slow tier (%s): this store cannot share a prefix", kind())); }

void SlowStore::share_prefix(std::shared_ptr<SlowStore> base, int64_t n) {
  SPC_CHECK(base != nullptr && base.get() != this, "slow tier: a shared prefix needs another store");
  const SlowGeometry& b = base->geometry();
  SPC_CHECK(b.n_layer == geom_.n_layer && b.n_head_kv == geom_.n_head_kv && b.head_dim == geom_.head_dim,
            "slow tier: cannot share a prefix between stores of other geometries (%d x %d x %d against %d x %d x %d)",
            b.n_layer, b.n_head_kv, b.head_dim, geom_.n_layer, geom_.n_head_kv, geom_.head_dim);
  SPC_CHECK(n >= 0 && n <= geom_.max_ctx, "slow tier: a shared prefix of %lld positions does not fit %lld",
            (long long)n, (long long)geom_.max_ctx);
  for (int il = 0; il < geom_.n_layer; ++il) {
    SPC_CHECK(written(il) == 0, "slow tier: a prefix can only be shared into an empty store");
    SPC_CHECK(base->written(il) >= n, "slow tier: the base store holds %lld positions of layer %d, not the %lld shared",
              (long long)base->written(il), il, (long long)n);
  }
  if (n == 0) return;
  start_at(n);
  base_ = std::move(base);
  n_base_ = n;
}

namespace {

std::string errstr(int e) { return std::string(std::strerror(e)); }

const SlowGeometry& check_geometry(const SlowGeometry& g) {
  SPC_CHECK(g.n_layer >= 1 && g.n_head_kv >= 1 && g.head_dim >= 1 && g.max_ctx >= 1,
            "slow tier: bad geometry (n_layer=%d n_head_kv=%d head_dim=%d max_ctx=%lld): all must be >= 1",
            g.n_layer, g.n_head_kv, g.head_dim, (long long)g.max_ctx);
  int64_t total = 0;
  const bool overflow = __builtin_mul_overflow((int64_t)g.n_layer, (int64_t)g.n_head_kv, &total) ||
                        __builtin_mul_overflow(total, g.max_ctx, &total) ||
                        __builtin_mul_overflow(total, (int64_t)g.row_bytes(), &total);
  SPC_CHECK(!overflow && total < ((int64_t)1 << 62),
            "slow tier: geometry too large (%d layers x %d heads x %lld positions x %zu bytes)", g.n_layer,
            g.n_head_kv, (long long)g.max_ctx, g.row_bytes());
  return g;
}

// Destination row of refs[i] within a batch (see RowRef::dst_row).
inline size_t dst_index(const RowRef& r, size_t i) { return r.dst_row >= 0 ? (size_t)r.dst_row : i; }

// Shared bookkeeping: per-layer high-water marks and bounds checks.
class StoreBase : public SlowStore {
 public:
  explicit StoreBase(const SlowGeometry& g)
      : SlowStore(check_geometry(g)), written_(new std::atomic<int64_t>[(size_t)g.n_layer]) {
    for (int i = 0; i < g.n_layer; ++i) written_[i].store(0);
  }

  size_t bytes_stored() const override {
    size_t pos = 0;
    for (int i = 0; i < geom_.n_layer; ++i) pos += (size_t)(written_[i].load(std::memory_order_acquire) - n_base_);
    return pos * (size_t)geom_.n_head_kv * geom_.row_bytes();
  }

  int64_t written(int il) const override {
    SPC_CHECK(il >= 0 && il < geom_.n_layer, "slow tier: layer %d out of range [0, %d)", il, geom_.n_layer);
    return written_[il].load(std::memory_order_acquire);
  }

  // A shared prefix's rows come from the base store, the others from this one (read_own).
  void read_rows(const RowRef* refs, size_t n, void* dst) final {
    if (n_base_ == 0) return read_own(refs, n, dst);
    std::vector<RowRef> lo, hi;
    for (size_t i = 0; i < n; ++i) {
      RowRef r = refs[i];
      r.dst_row = (int64_t)dst_index(refs[i], i);
      (r.pos >= 0 && r.pos < n_base_ ? lo : hi).push_back(r);
    }
    if (!lo.empty()) base_->read_rows(lo.data(), lo.size(), dst);
    if (!hi.empty()) read_own(hi.data(), hi.size(), dst);
  }

  void read_range(int il, int head, int64_t pos0, int64_t n, void* dst) final {
    check_range(il, head, pos0, n);
    const int64_t nb = std::clamp<int64_t>(n_base_ - pos0, 0, n);
    if (nb > 0) base_->read_range(il, head, pos0, nb, dst);
    if (n > nb) read_range_own(il, head, pos0 + nb, n - nb, static_cast<char*>(dst) + (size_t)nb * geom_.row_bytes());
  }

 protected:
  // This store's own rows (positions >= shared_positions()): refs with their dst_row set, or not.
  virtual void read_own(const RowRef* refs, size_t n, void* dst) = 0;
  // Checked by read_range.
  virtual void read_range_own(int il, int head, int64_t pos0, int64_t n, void* dst) = 0;
  void start_at(int64_t n) override {
    for (int i = 0; i < geom_.n_layer; ++i) written_[i].store(n, std::memory_order_release);
  }

  int64_t offset_rows(int il, int h, int64_t pos) const {
    return ((int64_t)il * geom_.n_head_kv + h) * geom_.max_ctx + pos;
  }
  int64_t offset_bytes(int il, int h, int64_t pos) const {
    return offset_rows(il, h, pos) * (int64_t)geom_.row_bytes();
  }

  void check_write(int il, int64_t pos0, int64_t n, const void* rows) const {
    SPC_CHECK(il >= 0 && il < geom_.n_layer, "slow tier write: layer %d out of range [0, %d)", il, geom_.n_layer);
    SPC_CHECK(n >= 0 && pos0 >= 0 && pos0 + n <= geom_.max_ctx,
              "slow tier write: positions [%lld, %lld) outside [0, max_ctx=%lld)", (long long)pos0,
              (long long)(pos0 + n), (long long)geom_.max_ctx);
    const int64_t w = written_[il].load(std::memory_order_relaxed);
    SPC_CHECK(pos0 <= w, "slow tier write: layer %d position %lld would leave a gap (only %lld positions written)",
              il, (long long)pos0, (long long)w);
    SPC_CHECK(n == 0 || pos0 >= n_base_, "slow tier write: positions below %lld are a shared prefix (read-only)",
              (long long)n_base_);
    SPC_CHECK(n == 0 || rows != nullptr, "slow tier write: null rows");
  }
  void publish_write(int il, int64_t pos0, int64_t n) {
    const int64_t end = pos0 + n;
    if (end > written_[il].load(std::memory_order_relaxed)) written_[il].store(end, std::memory_order_release);
  }

  void check_ref(const RowRef& r) const {
    SPC_CHECK(r.layer >= 0 && r.layer < geom_.n_layer, "slow tier read: layer %d out of range [0, %d)", r.layer,
              geom_.n_layer);
    SPC_CHECK(r.head >= 0 && r.head < geom_.n_head_kv, "slow tier read: head %d out of range [0, %d)", r.head,
              geom_.n_head_kv);
    const int64_t w = written_[r.layer].load(std::memory_order_acquire);
    SPC_CHECK(r.pos >= 0 && r.pos < w,
              "slow tier read: layer %d head %d position %lld was never written (%lld positions written)", r.layer,
              r.head, (long long)r.pos, (long long)w);
  }
  void check_range(int il, int head, int64_t pos0, int64_t n) const {
    SPC_CHECK(il >= 0 && il < geom_.n_layer, "slow tier read: layer %d out of range [0, %d)", il, geom_.n_layer);
    SPC_CHECK(head >= 0 && head < geom_.n_head_kv, "slow tier read: head %d out of range [0, %d)", head,
              geom_.n_head_kv);
    const int64_t w = written_[il].load(std::memory_order_acquire);
    SPC_CHECK(n >= 0 && pos0 >= 0 && pos0 + n <= w,
              "slow tier read: layer %d head %d positions [%lld, %lld) not all written (%lld positions written)", il,
              head, (long long)pos0, (long long)(pos0 + n), (long long)w);
  }

 private:
  std::unique_ptr<std::atomic<int64_t>[]> written_;
};

// ---------------------------------------------------------------------------------------------
// Host (RAM) store.

class HostStore final : public StoreBase {
 public:
  explicit HostStore(const SlowGeometry& g) : StoreBase(g) {
    bytes_ = (size_t)g.n_layer * g.n_head_kv * (size_t)g.max_ctx * g.row_bytes();
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    SPC_CHECK(p != MAP_FAILED, "slow tier (host): cannot reserve %zu bytes of address space: %s", bytes_,
              errstr(errno).c_str());
    base_ = static_cast<char*>(p);
  }
  ~HostStore() override { munmap(base_, bytes_); }

  const char* kind() const override { return "host"; }
  const char* io_backend() const override { return "memory"; }

  void write_rows(int il, int64_t pos0, int64_t n, const void* rows) override {
    check_write(il, pos0, n, rows);
    const size_t rb = geom_.row_bytes();
    const char* src = static_cast<const char*>(rows);
    for (int h = 0; h < geom_.n_head_kv; ++h) {
      char* d = base_ + offset_bytes(il, h, pos0);
      for (int64_t t = 0; t < n; ++t) std::memcpy(d + t * rb, src + ((size_t)t * geom_.n_head_kv + h) * rb, rb);
    }
    publish_write(il, pos0, n);
  }

  void read_own(const RowRef* refs, size_t n, void* dst) override {
    for (size_t i = 0; i < n; ++i) check_ref(refs[i]);
    const size_t rb = geom_.row_bytes();
    char* d = static_cast<char*>(dst);
    // Scattered rows: each is a few cache-line misses the hardware prefetcher cannot predict.
    // Requesting the rows kDist ahead keeps that many in flight instead of one at a time.
    constexpr size_t kDist = 8;
    auto prefetch = [&](size_t i) { prefetch_bytes(base_ + offset_bytes(refs[i].layer, refs[i].head, refs[i].pos), rb); };
    for (size_t i = 0; i < std::min(n, kDist); ++i) prefetch(i);
    for (size_t i = 0; i < n; ++i) {
      if (i + kDist < n) prefetch(i + kDist);
      std::memcpy(d + dst_index(refs[i], i) * rb, base_ + offset_bytes(refs[i].layer, refs[i].head, refs[i].pos), rb);
    }
  }

  void read_range_own(int il, int head, int64_t pos0, int64_t n, void* dst) override {
    if (n > 0) std::memcpy(dst, base_ + offset_bytes(il, head, pos0), (size_t)n * geom_.row_bytes());
  }

 private:
  char* base_ = nullptr;
  size_t bytes_ = 0;
};

// ---------------------------------------------------------------------------------------------
// File store.

constexpr unsigned kRingDepth = 128;
constexpr size_t kMaxIov = 512;  // < IOV_MAX (1024)

class FileStore final : public StoreBase {
 public:
  FileStore(const SlowGeometry& g, const std::string& dir, const FileStoreOptions& opt) : StoreBase(g), dir_(dir) {
    struct stat st;
    if (::stat(dir.c_str(), &st) != 0)
      throw Error(strfmt("slow tier (file): directory '%s' is not usable: %s", dir.c_str(), errstr(errno).c_str()));
    if (!S_ISDIR(st.st_mode))
      throw Error(strfmt("slow tier (file): '%s' is not a directory: %s", dir.c_str(), errstr(ENOTDIR).c_str()));
    fd_ = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd_ >= 0) {
      name_ = dir + "/<O_TMPFILE>";
    } else if (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL) {
      // Filesystem without O_TMPFILE: create a unique name and unlink it at once.
      std::string tmpl = dir + "/specache-slow-XXXXXX";
      std::vector<char> buf(tmpl.begin(), tmpl.end());
      buf.push_back('\0');
      fd_ = ::mkostemp(buf.data(), O_CLOEXEC);
      if (fd_ < 0)
        throw Error(strfmt("slow tier (file): cannot create a file in '%s': %s", dir.c_str(), errstr(errno).c_str()));
      name_ = std::string(buf.data()) + " (unlinked)";
      if (::unlink(buf.data()) != 0) {
        const int e = errno;
        ::close(fd_);
        throw Error(strfmt("slow tier (file): cannot unlink '%s': %s", buf.data(), errstr(e).c_str()));
      }
    } else {
      throw Error(strfmt("slow tier (file): cannot create a file in '%s': %s", dir.c_str(), errstr(errno).c_str()));
    }

    const bool want_uring = opt.use_io_uring && !env_flag("SPECACHE_NO_URING");
    if (want_uring) {
      const int r = io_uring_queue_init(kRingDepth, &ring_, 0);
      if (r == 0) {
        have_ring_ = true;
      } else {
        uring_error_ = errstr(-r);
      }
    }
  }

  ~FileStore() override {
    if (have_ring_) io_uring_queue_exit(&ring_);
    if (fd_ >= 0) ::close(fd_);
  }

  const char* kind() const override { return "file"; }
  const char* io_backend() const override { return have_ring_ && ring_ok_.load() ? "io_uring" : "pread"; }

  void write_rows(int il, int64_t pos0, int64_t n, const void* rows) override {
    check_write(il, pos0, n, rows);
    if (n == 0) return;
    const size_t rb = geom_.row_bytes();
    const int nh = geom_.n_head_kv;
    const char* src = static_cast<const char*>(rows);
    // One pwrite per head: transpose the token-major input into a contiguous run of n rows.
    stage_.resize((size_t)n * rb);
    for (int h = 0; h < nh; ++h) {
      for (int64_t t = 0; t < n; ++t) std::memcpy(stage_.data() + t * rb, src + ((size_t)t * nh + h) * rb, rb);
      write_full(stage_.data(), stage_.size(), offset_bytes(il, h, pos0));
    }
    publish_write(il, pos0, n);
  }

  void read_own(const RowRef* refs, size_t n, void* dst) override {
    if (n == 0) return;
    for (size_t i = 0; i < n; ++i) check_ref(refs[i]);
    const size_t rb = geom_.row_bytes();
    char* d = static_cast<char*>(dst);

    // Sort by file offset, then coalesce adjacent rows into one vectored read each.
    std::vector<std::pair<int64_t, size_t>> order(n);
    for (size_t i = 0; i < n; ++i) order[i] = {offset_rows(refs[i].layer, refs[i].head, refs[i].pos), i};
    std::sort(order.begin(), order.end());
    std::vector<iovec> iov(n);
    std::vector<Run> runs;
    for (size_t k = 0; k < n; ++k) {
      iov[k] = {d + dst_index(refs[order[k].second], order[k].second) * rb, rb};
      if (k > 0 && order[k].first == order[k - 1].first + 1 && runs.back().cnt < kMaxIov) {
        ++runs.back().cnt;
      } else {
        runs.push_back({(off_t)(order[k].first * (int64_t)rb), k, 1});
      }
    }

    std::unique_lock<std::mutex> lock(ring_mu_, std::defer_lock);
    if (have_ring_ && ring_ok_.load() && lock.try_lock()) {
      read_runs_uring(runs, iov.data(), rb);
    } else {
      for (const Run& r : runs) read_full_iov(iov.data() + r.first, r.cnt, r.off, 0);
    }
  }

  void read_range_own(int il, int head, int64_t pos0, int64_t n, void* dst) override {
    if (n == 0) return;
    iovec v{dst, (size_t)n * geom_.row_bytes()};
    read_full_iov(&v, 1, offset_bytes(il, head, pos0), 0);
  }

 private:
  struct Run {
    off_t off;   // file offset of the first row
    size_t first;  // index into the iovec array
    size_t cnt;    // rows in the run
  };

  void write_full(const char* p, size_t len, int64_t off) {
    size_t done = 0;
    while (done < len) {
      const ssize_t w = ::pwrite(fd_, p + done, len - done, (off_t)(off + (int64_t)done));
      if (w < 0) {
        if (errno == EINTR) continue;
        const int e = errno;
        throw Error(strfmt("slow tier (file): write of %zu bytes at offset %lld to %s failed after %zu bytes: %s%s",
                           len, (long long)off, name_.c_str(), done, errstr(e).c_str(),
                           (e == ENOSPC || e == EFBIG || e == EDQUOT) ? " (disk full or file size limit)" : ""));
      }
      if (w == 0)
        throw Error(strfmt("slow tier (file): write of %zu bytes at offset %lld to %s made no progress after %zu bytes",
                           len, (long long)off, name_.c_str(), done));
      done += (size_t)w;
    }
  }

  // Reads the bytes described by iov[0..cnt) from file offset off, skipping the first `skip` bytes
  // (already read). Short reads (EOF) throw.
  void read_full_iov(const iovec* iov, size_t cnt, int64_t off, size_t skip) {
    size_t total = 0;
    for (size_t i = 0; i < cnt; ++i) total += iov[i].iov_len;
    size_t done = skip;
    std::vector<iovec> rest;
    while (done < total) {
      rest.clear();
      size_t acc = 0;
      for (size_t i = 0; i < cnt; ++i) {
        const size_t len = iov[i].iov_len;
        if (acc + len > done) {
          const size_t s = done > acc ? done - acc : 0;
          rest.push_back({static_cast<char*>(iov[i].iov_base) + s, len - s});
        }
        acc += len;
      }
      const ssize_t r = ::preadv(fd_, rest.data(), (int)rest.size(), (off_t)(off + (int64_t)done));
      if (r < 0) {
        if (errno == EINTR) continue;
        throw Error(strfmt("slow tier (file): read of %zu bytes at offset %lld from %s failed: %s", total,
                           (long long)off, name_.c_str(), errstr(errno).c_str()));
      }
      if (r == 0) short_read(total, off, done);
      done += (size_t)r;
    }
  }

  [[noreturn]] void short_read(size_t want, int64_t off, size_t got) const {
    throw Error(strfmt("slow tier (file): short read from %s at offset %lld: wanted %zu bytes, got %zu "
                       "(file truncated or rows never written)",
                       name_.c_str(), (long long)off, want, got));
  }

  void read_runs_uring(const std::vector<Run>& runs, const iovec* iov, size_t rb) {
    size_t next = 0, inflight = 0;
    std::vector<int64_t> results(runs.size(), 0);
    while (next < runs.size() || inflight > 0) {
      // Queue as many runs as the submission ring takes, then submit them in one call.
      size_t queued = 0;
      while (next < runs.size() && inflight + queued < kRingDepth) {
        io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
        if (!sqe) break;
        const Run& r = runs[next];
        if (r.cnt == 1)
          io_uring_prep_read(sqe, fd_, iov[r.first].iov_base, (unsigned)rb, (uint64_t)r.off);
        else
          io_uring_prep_readv(sqe, fd_, iov + r.first, (unsigned)r.cnt, (uint64_t)r.off);
        io_uring_sqe_set_data64(sqe, next);
        ++next;
        ++queued;
      }
      const unsigned wait_nr = (unsigned)std::min<size_t>(inflight + queued, kRingDepth);
      int s;
      do {
        s = io_uring_submit_and_wait(&ring_, wait_nr ? 1 : 0);
      } while (s == -EINTR);
      if (s < 0) {
        // The ring's state is unknown now: stop using it (later reads take the preadv path).
        drain_ring(inflight);
        ring_ok_.store(false);
        throw Error(strfmt("slow tier (file): io_uring submit on %s failed: %s", name_.c_str(), errstr(-s).c_str()));
      }
      // The kernel normally takes every queued entry; if it took fewer, push the rest now so that
      // no waited-for request is left sitting unsubmitted in the queue.
      while (io_uring_sq_ready(&ring_) > 0) {
        const int s2 = io_uring_submit(&ring_);
        if (s2 >= 0 || s2 == -EINTR) continue;
        if (s2 == -EAGAIN || s2 == -EBUSY) {
          std::this_thread::yield();
          continue;
        }
        drain_ring(inflight + queued - io_uring_sq_ready(&ring_));
        ring_ok_.store(false);
        throw Error(strfmt("slow tier (file): io_uring submit on %s failed: %s", name_.c_str(), errstr(-s2).c_str()));
      }
      inflight += queued;
      // Reap everything that has completed.
      io_uring_cqe* cqe;
      while (inflight > 0) {
        int w = io_uring_peek_cqe(&ring_, &cqe);
        if (w == -EAGAIN) {
          if (next < runs.size()) break;  // go queue more
          w = io_uring_wait_cqe(&ring_, &cqe);
          if (w == -EINTR) continue;
        }
        if (w < 0) {
          ring_ok_.store(false);
          throw Error(strfmt("slow tier (file): io_uring wait on %s failed: %s", name_.c_str(), errstr(-w).c_str()));
        }
        results[io_uring_cqe_get_data64(cqe)] = cqe->res;
        io_uring_cqe_seen(&ring_, cqe);
        --inflight;
      }
    }
    // Check results; finish short reads synchronously (which throws on EOF).
    for (size_t k = 0; k < runs.size(); ++k) {
      const Run& r = runs[k];
      const int64_t want = (int64_t)(r.cnt * rb);
      if (results[k] < 0) {
        const int e = (int)-results[k];
        if (e == EAGAIN || e == EINTR) {
          read_full_iov(iov + r.first, r.cnt, r.off, 0);
          continue;
        }
        throw Error(strfmt("slow tier (file): read of %lld bytes at offset %lld from %s failed: %s", (long long)want,
                           (long long)r.off, name_.c_str(), errstr(e).c_str()));
      }
      if (results[k] < want) read_full_iov(iov + r.first, r.cnt, r.off, (size_t)results[k]);
    }
  }

  // Error path: wait for every in-flight request so that no kernel write lands in freed memory.
  void drain_ring(size_t inflight) {
    while (inflight > 0) {
      io_uring_cqe* cqe;
      const int w = io_uring_wait_cqe(&ring_, &cqe);
      if (w == -EINTR) continue;
      if (w < 0) break;
      io_uring_cqe_seen(&ring_, cqe);
      --inflight;
    }
  }

  std::string dir_, name_;
  int fd_ = -1;
  std::vector<char> stage_;
  io_uring ring_{};
  bool have_ring_ = false;
  std::atomic<bool> ring_ok_{true};
  std::string uring_error_;
  std::mutex ring_mu_;
};

}  // namespace

std::unique_ptr<SlowStore> make_host_store(const SlowGeometry& g) { return std::make_unique<HostStore>(g); }

std::unique_ptr<SlowStore> make_file_store(const SlowGeometry& g, const std::string& dir,
                                           const FileStoreOptions& opt) {
  return std::make_unique<FileStore>(g, dir, opt);
}

}  // namespace spc
