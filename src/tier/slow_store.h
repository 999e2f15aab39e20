// The slow tier: the complete 16-bit KV cache, one contiguous run of rows per (layer, KV head).
// One row = K (head_dim fp16) then V (head_dim fp16) = 4*head_dim bytes, indexed by position,
// so a top-k fetch is k small row reads (gathered in one batched call).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace spc {

struct SlowGeometry {
  int n_layer = 0;
  int n_head_kv = 0;
  int head_dim = 0;
  int64_t max_ctx = 0;
  size_t row_bytes() const { return 4 * static_cast<size_t>(head_dim); }
};

struct RowRef {
  int32_t layer;
  int32_t head;
  int64_t pos;
  int64_t dst_row = -1;  // row index in the destination buffer; -1: the ref's own index in the batch
};

// Storage only. Thread-safe for concurrent reads of written rows plus one writer.
// Per layer, positions [0, written(il)) are valid; writes must not leave gaps
// (pos0 <= written(il)); reading a position >= written(il) throws spc::Error.
class SlowStore {
 public:
  virtual ~SlowStore();
  virtual const char* kind() const = 0;        // "host" or "file"
  virtual const char* io_backend() const = 0;  // "memory", "io_uring" or "pread"
  const SlowGeometry& geometry() const { return geom_; }

  // Writes positions [pos0, pos0+n) of layer il for all KV heads.
  // rows: [n][n_head_kv][row_bytes], token-major as the model produces them.
  virtual void write_rows(int il, int64_t pos0, int64_t n, const void* rows) = 0;
  // Batched gather: for each i, copies row refs[i] into dst + r*row_bytes, r = refs[i].dst_row, or
  // i where that is -1 (a scatter into the slots of a caller's buffer). One call per batch.
  virtual void read_rows(const RowRef* refs, size_t n, void* dst) = 0;
  // Reads a contiguous position range of one (layer, head): dst [n][row_bytes].
  virtual void read_range(int il, int head, int64_t pos0, int64_t n, void* dst) = 0;
  // Bytes of rows actually written here: sum over layers of n_head_kv * (written(il) -
  // shared_positions()) * row_bytes (a shared prefix is the base's).
  virtual size_t bytes_stored() const = 0;
  // Number of positions written for layer il (the high-water mark).
  virtual int64_t written(int il) const = 0;

  // Shared prompt prefix: positions [0, n) of every layer are read from `base` (another store of
  // the same layer, head and row geometry, holding at least n positions of every layer) instead of
  // being written here; written() starts at n and writes continue from there. Only on an empty
  // store. Stores are append-only, so the base's first n positions never change; the shared_ptr
  // keeps them alive after their first owner is gone. Reads of the base run concurrently with its
  // owner's (both store kinds allow that). Throws spc::Error for a non-empty store, a base of
  // another geometry, or a base holding fewer than n positions.
  void share_prefix(std::shared_ptr<SlowStore> base, int64_t n);
  // Positions read from the base store (0 without one).
  int64_t shared_positions() const { return n_base_; }

 protected:
  explicit SlowStore(const SlowGeometry& g) : geom_(g) {}
  // Called by share_prefix after its checks: the store's high-water marks start at n, and reads
  // below n go to base_. Stores that cannot share (the default) throw spc::Error.
  virtual void start_at(int64_t n);
  SlowGeometry geom_;
  std::shared_ptr<SlowStore> base_;
  int64_t n_base_ = 0;
};

// RAM store: one anonymous MAP_NORESERVE mapping of the full layout; untouched pages cost nothing.
std::unique_ptr<SlowStore> make_host_store(const SlowGeometry& g);

struct FileStoreOptions {
  bool use_io_uring = true;  // false: force the pread/preadv path. Env SPECACHE_NO_URING=1 also forces it.
};

// File store: an anonymous (O_TMPFILE, or created then unlinked) sparse file in dir;
// offset(il, h, pos) = ((il*n_head_kv + h)*max_ctx + pos) * row_bytes. Nothing is mmapped.
std::unique_ptr<SlowStore> make_file_store(const SlowGeometry& g, const std::string& dir,
                                           const FileStoreOptions& opt = {});

}  // namespace spc
