// Large zero-initialized buffer whose pages cost resident memory only once touched
// (anonymous mmap with MAP_NORESERVE): a cache sized for the whole context but filled
// token by token is charged for what it holds.
//
// Huge pages (LazyBuffer::huge): the buffer starts on a 2 MiB boundary and asks Linux for
// transparent huge pages (madvise MADV_HUGEPAGE; best effort, and the host's THP setting may
// refuse). For buffers that are written in full soon after they are made (the interleaved weight
// copy): each 2 MiB page is charged whole at its first touch, so a buffer filled piece by piece
// over a long time would lose the lazy charging above. What it buys is fewer TLB misses on a
// stream: decode reads ~96 MB of weights per token, 24K pages of 4 KiB, and once a long context's
// KV stream has pushed their page-table entries out of the caches, each page's first access waits
// for a page walk (SmolLM2 at 32K context: the matmuls 10-20% faster with huge pages,
// docs/BENCHMARKS.md). SPECACHE_NO_HUGEPAGES=1 turns the request off.
#pragma once
#include <cstddef>
#include <cstdint>

namespace spc {

class LazyBuffer {
 public:
  enum Pages { normal, huge };

  LazyBuffer() = default;
  explicit LazyBuffer(size_t bytes, Pages pages = normal);
  ~LazyBuffer();
  LazyBuffer(LazyBuffer&& o) noexcept;
  LazyBuffer& operator=(LazyBuffer&& o) noexcept;
  LazyBuffer(const LazyBuffer&) = delete;
  LazyBuffer& operator=(const LazyBuffer&) = delete;

  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  template <typename T> T* as() { return reinterpret_cast<T*>(data_); }
  template <typename T> const T* as() const { return reinterpret_cast<const T*>(data_); }
  // Whether Linux was asked for huge pages (the request succeeded; not whether it grants them).
  bool huge_pages_requested() const { return huge_; }

 private:
  void release();

  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  void* map_ = nullptr;  // the mapping (data_ may start past it, on a 2 MiB boundary)
  size_t map_bytes_ = 0;
  bool huge_ = false;
};

}  // namespace spc
