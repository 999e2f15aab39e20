#include "util/lazy_buffer.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "util/env.h"
#include "util/error.h"

namespace spc {

namespace {
constexpr size_t kHugePage = size_t(2) << 20;

bool huge_pages_allowed() {
  static const bool allowed = !env_flag("SPECACHE_NO_HUGEPAGES");
  return allowed;
}
}  // namespace

LazyBuffer::LazyBuffer(size_t bytes, Pages pages) : size_(bytes) {
  if (bytes == 0) return;
  const bool want_huge = pages == huge && huge_pages_allowed();
  // Room to start on a 2 MiB boundary: the kernel maps huge pages only at aligned addresses.
  map_bytes_ = want_huge ? bytes + kHugePage : bytes;
  void* p = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    map_bytes_ = 0;
    size_ = 0;
    throw Error(strfmt("cannot reserve %zu bytes of address space: %s", bytes, std::strerror(errno)));
  }
  map_ = p;
  data_ = static_cast<uint8_t*>(p);
#if defined(MADV_HUGEPAGE)
  if (want_huge) {
    const uintptr_t a = ((uintptr_t)p + kHugePage - 1) & ~(uintptr_t)(kHugePage - 1);
    data_ = reinterpret_cast<uint8_t*>(a);
    huge_ = madvise(data_, bytes, MADV_HUGEPAGE) == 0;  // best effort (EINVAL without THP)
  }
#endif
}

void LazyBuffer::release() {
  if (map_) munmap(map_, map_bytes_);
  map_ = nullptr;
  data_ = nullptr;
  size_ = map_bytes_ = 0;
  huge_ = false;
}

LazyBuffer::~LazyBuffer() { release(); }

LazyBuffer::LazyBuffer(LazyBuffer&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      map_(std::exchange(o.map_, nullptr)),
      map_bytes_(std::exchange(o.map_bytes_, 0)),
      huge_(std::exchange(o.huge_, false)) {}

LazyBuffer& LazyBuffer::operator=(LazyBuffer&& o) noexcept {
  if (this != &o) {
    release();
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    map_ = std::exchange(o.map_, nullptr);
    map_bytes_ = std::exchange(o.map_bytes_, 0);
    huge_ = std::exchange(o.huge_, false);
  }
  return *this;
}

}  // namespace spc
