#include "gguf/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <unordered_set>

#include "util/error.h"

namespace spc {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" little-endian
constexpr int kMaxArrayDepth = 4;

size_t scalar_size(GgufType t) {
  switch (t) {
    case GgufType::UINT8: case GgufType::INT8: case GgufType::BOOL: return 1;
    case GgufType::UINT16: case GgufType::INT16: return 2;
    case GgufType::UINT32: case GgufType::INT32: case GgufType::FLOAT32: return 4;
    case GgufType::UINT64: case GgufType::INT64: case GgufType::FLOAT64: return 8;
    default: return 0;
  }
}

// Bounds-checked little-endian cursor over the mapping.
class Cursor {
 public:
  Cursor(const std::string& path, const uint8_t* base, size_t size) : path_(path), base_(base), size_(size) {}
  size_t pos() const { return pos_; }
  size_t remaining() const { return size_ - pos_; }

  [[noreturn]] void fail(const std::string& what) const {
    throw Error(strfmt("%s: %s (at byte offset %zu of %zu)", path_.c_str(), what.c_str(), pos_, size_));
  }
  const uint8_t* take(size_t n, const char* what) {
    if (n > remaining()) fail(strfmt("file truncated while reading %s (need %zu bytes, %zu left)", what, n, remaining()));
    const uint8_t* p = base_ + pos_;
    pos_ += n;
    return p;
  }
  template <typename T>
  T read(const char* what) {
    T v;
    std::memcpy(&v, take(sizeof(T), what), sizeof(T));
    return v;
  }
  std::string_view read_string(const char* what) {
    const uint64_t n = read<uint64_t>(what);
    if (n > remaining()) fail(strfmt("%s has length %llu but only %zu bytes remain", what, (unsigned long long)n, remaining()));
    const uint8_t* p = take(n, what);
    return std::string_view(reinterpret_cast<const char*>(p), n);
  }

 private:
  const std::string& path_;
  const uint8_t* base_;
  size_t size_;
  size_t pos_ = 0;
};

GgufType read_value_type(Cursor& c, const char* what) {
  const uint32_t t = c.read<uint32_t>(what);
  if (t > static_cast<uint32_t>(GgufType::FLOAT64)) c.fail(strfmt("invalid metadata value type %u for %s", t, what));
  return static_cast<GgufType>(t);
}

void read_value(Cursor& c, GgufType type, GgufValue& v, int depth, const std::string& key);

void read_scalar(Cursor& c, GgufType type, GgufValue& v, const std::string& key) {
  const char* what = "metadata value";
  switch (type) {
    case GgufType::UINT8: v.u = c.read<uint8_t>(what); v.i = (int64_t)v.u; break;
    case GgufType::INT8: v.i = c.read<int8_t>(what); v.u = (uint64_t)v.i; break;
    case GgufType::UINT16: v.u = c.read<uint16_t>(what); v.i = (int64_t)v.u; break;
    case GgufType::INT16: v.i = c.read<int16_t>(what); v.u = (uint64_t)v.i; break;
    case GgufType::UINT32: v.u = c.read<uint32_t>(what); v.i = (int64_t)v.u; break;
    case GgufType::INT32: v.i = c.read<int32_t>(what); v.u = (uint64_t)v.i; break;
    case GgufType::UINT64: v.u = c.read<uint64_t>(what); v.i = (int64_t)v.u; break;
    case GgufType::INT64: v.i = c.read<int64_t>(what); v.u = (uint64_t)v.i; break;
    case GgufType::FLOAT32: v.f = c.read<float>(what); break;
    case GgufType::FLOAT64: v.f = c.read<double>(what); break;
    case GgufType::BOOL: {
      const uint8_t b = c.read<uint8_t>(what);
      if (b > 1) c.fail(strfmt("metadata key '%s': bool value %u is not 0 or 1", key.c_str(), b));
      v.u = b; v.i = b;
      break;
    }
    case GgufType::STRING: v.str = c.read_string("metadata string"); break;
    default: SPC_ASSERT(false);
  }
}

void read_value(Cursor& c, GgufType type, GgufValue& v, int depth, const std::string& key) {
  v.type = type;
  if (type != GgufType::ARRAY) {
    read_scalar(c, type, v, key);
    return;
  }
  if (depth >= kMaxArrayDepth) c.fail(strfmt("metadata key '%s': arrays nested deeper than %d", key.c_str(), kMaxArrayDepth));
  v.arr_type = read_value_type(c, "array element type");
  v.arr_n = c.read<uint64_t>("array length");
  const size_t es = scalar_size(v.arr_type);
  if (es > 0) {
    if (v.arr_n > c.remaining() / es)
      c.fail(strfmt("metadata key '%s': array of %llu elements does not fit in the file", key.c_str(), (unsigned long long)v.arr_n));
    v.arr_data = c.take(v.arr_n * es, "array data");
  } else if (v.arr_type == GgufType::STRING) {
    if (v.arr_n > c.remaining() / 8)
      c.fail(strfmt("metadata key '%s': array of %llu strings does not fit in the file", key.c_str(), (unsigned long long)v.arr_n));
    v.arr_str.reserve(v.arr_n);
    for (uint64_t k = 0; k < v.arr_n; ++k) v.arr_str.push_back(c.read_string("string array element"));
  } else {  // nested arrays: validated and skipped
    if (v.arr_n > c.remaining() / 12)
      c.fail(strfmt("metadata key '%s': nested array of %llu elements does not fit in the file", key.c_str(), (unsigned long long)v.arr_n));
    for (uint64_t k = 0; k < v.arr_n; ++k) {
      GgufValue inner;
      read_value(c, GgufType::ARRAY, inner, depth + 1, key);
    }
  }
}

}  // namespace

const char* gguf_type_name(GgufType t) {
  static const char* names[] = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
                                "bool", "string", "array", "uint64", "int64", "float64"};
  const auto i = static_cast<uint32_t>(t);
  return i < 13 ? names[i] : "?";
}

bool GgufValue::is_int() const {
  switch (type) {
    case GgufType::UINT8: case GgufType::INT8: case GgufType::UINT16: case GgufType::INT16:
    case GgufType::UINT32: case GgufType::INT32: case GgufType::UINT64: case GgufType::INT64: return true;
    default: return false;
  }
}

std::string GgufValue::to_string() const {
  if (is_int()) return (type == GgufType::UINT64) ? std::to_string(u) : std::to_string(i);
  if (is_float()) return strfmt("%g", f);
  if (type == GgufType::BOOL) return u ? "true" : "false";
  if (type == GgufType::STRING) {
    std::string s(str.substr(0, 80));
    for (char& ch : s)
      if (ch == '\n') ch = ' ';
    return str.size() > 80 ? s + "..." : s;
  }
  return strfmt("[%s x %llu]", gguf_type_name(arr_type), (unsigned long long)arr_n);
}

std::string GgufTensorInfo::shape_string() const {
  std::string s = "[";
  for (int d = 0; d < n_dims; ++d) s += (d ? ", " : "") + std::to_string(ne[d]);
  return s + "]";
}

std::unique_ptr<GgufFile> GgufFile::open(const std::string& path) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->path_ = path;
  f->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f->fd_ < 0) throw Error(strfmt("%s: cannot open model file: %s", path.c_str(), std::strerror(errno)));
  struct stat st {};
  if (fstat(f->fd_, &st) != 0) throw Error(strfmt("%s: cannot stat: %s", path.c_str(), std::strerror(errno)));
  if (!S_ISREG(st.st_mode)) throw Error(strfmt("%s: not a regular file", path.c_str()));
  f->size_ = static_cast<size_t>(st.st_size);
  if (f->size_ < 8) throw Error(strfmt("%s: not a GGUF file (only %zu bytes)", path.c_str(), f->size_));
  void* p = mmap(nullptr, f->size_, PROT_READ, MAP_SHARED, f->fd_, 0);
  if (p == MAP_FAILED) throw Error(strfmt("%s: mmap failed: %s", path.c_str(), std::strerror(errno)));
  f->base_ = static_cast<const uint8_t*>(p);
  f->parse();
  return f;
}

GgufFile::~GgufFile() {
  if (base_) munmap(const_cast<uint8_t*>(base_), size_);
  if (fd_ >= 0) ::close(fd_);
}

void GgufFile::release_pages(const void* p, size_t n) const {
  const uintptr_t lo = (uintptr_t)p, hi = lo + n;
  SPC_CHECK(lo >= (uintptr_t)base_ && hi <= (uintptr_t)base_ + size_ && hi >= lo,
            "%s: release_pages: range outside the mapping", path_.c_str());
  const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
  const uintptr_t a = (lo + page - 1) / page * page, b = hi / page * page;
  if (a < b) (void)madvise((void*)a, b - a, MADV_DONTNEED);
}

void GgufFile::parse() {
  Cursor c(path_, base_, size_);
  const uint32_t magic = c.read<uint32_t>("magic");
  if (magic != kMagic) throw Error(strfmt("%s: not a GGUF file (bad magic 0x%08x)", path_.c_str(), magic));
  version_ = c.read<uint32_t>("version");
  if (version_ != 2 && version_ != 3)
    throw Error(strfmt("%s: unsupported GGUF version %u (supported: 2, 3)", path_.c_str(), version_));
  const uint64_t n_tensors = c.read<uint64_t>("tensor count");
  const uint64_t n_kv = c.read<uint64_t>("metadata count");
  // Each metadata entry needs >= 13 bytes, each tensor info >= 24: reject absurd counts before reserving.
  if (n_kv > c.remaining() / 13) c.fail(strfmt("metadata count %llu cannot fit in the file", (unsigned long long)n_kv));
  if (n_tensors > c.remaining() / 24) c.fail(strfmt("tensor count %llu cannot fit in the file", (unsigned long long)n_tensors));

  kv_.reserve(n_kv);
  std::unordered_set<std::string_view> seen_keys;
  for (uint64_t k = 0; k < n_kv; ++k) {
    const std::string_view key = c.read_string("metadata key");
    if (!seen_keys.insert(key).second) c.fail(strfmt("duplicate metadata key '%.*s'", (int)key.size(), key.data()));
    GgufValue v;
    const GgufType t = read_value_type(c, "metadata value type");
    read_value(c, t, v, 0, std::string(key));
    kv_.emplace_back(std::string(key), std::move(v));
  }

  if (const GgufValue* a = find("general.alignment")) {
    if (!a->is_int() || a->u == 0 || (a->u & (a->u - 1)) != 0 || a->u > 65536)
      c.fail("general.alignment must be a power of two integer <= 65536");
    alignment_ = a->u;
  }

  tensors_.reserve(n_tensors);
  std::unordered_set<std::string> seen_names;
  for (uint64_t k = 0; k < n_tensors; ++k) {
    GgufTensorInfo ti;
    ti.name = std::string(c.read_string("tensor name"));
    if (!seen_names.insert(ti.name).second) c.fail(strfmt("duplicate tensor name '%s'", ti.name.c_str()));
    const uint32_t nd = c.read<uint32_t>("tensor dimension count");
    if (nd < 1 || nd > 4) c.fail(strfmt("tensor '%s' has %u dimensions (expected 1..4)", ti.name.c_str(), nd));
    ti.n_dims = (int)nd;
    for (uint32_t d = 0; d < nd; ++d) {
      const uint64_t ne = c.read<uint64_t>("tensor dimension");
      if (ne == 0 || ne > (1ull << 40))
        c.fail(strfmt("tensor '%s' dimension %u is %llu (expected 1..2^40)", ti.name.c_str(), d, (unsigned long long)ne));
      ti.ne[d] = (int64_t)ne;
    }
    const uint32_t type_id = c.read<uint32_t>("tensor type");
    const TypeTraits* tr = type_traits_or_null(type_id);
    if (!tr) c.fail(strfmt("tensor '%s' has unknown or unsupported type id %u", ti.name.c_str(), type_id));
    ti.type = static_cast<GgmlType>(type_id);
    ti.offset = c.read<uint64_t>("tensor data offset");
    if (ti.offset % alignment_ != 0)
      c.fail(strfmt("tensor '%s' data offset %llu is not a multiple of the alignment %zu", ti.name.c_str(),
                    (unsigned long long)ti.offset, alignment_));
    // n_elements and byte size with overflow checks.
    uint64_t n = 1;
    for (int d = 0; d < 4; ++d)
      if (__builtin_mul_overflow(n, (uint64_t)ti.ne[d], &n) || n > (1ull << 48))
        c.fail(strfmt("tensor '%s' has too many elements", ti.name.c_str()));
    if (ti.ne[0] % tr->block_size != 0)
      c.fail(strfmt("tensor '%s' row length %lld is not a multiple of the %s block size %lld", ti.name.c_str(),
                    (long long)ti.ne[0], tr->name, (long long)tr->block_size));
    ti.nbytes = (size_t)(n / tr->block_size) * tr->type_size;
    tensors_.push_back(std::move(ti));
  }

  const size_t data_start = (c.pos() + alignment_ - 1) / alignment_ * alignment_;
  if (data_start > size_ && !tensors_.empty()) c.fail("file truncated before the tensor data section");
  for (auto& ti : tensors_) {
    const size_t avail = size_ > data_start ? size_ - data_start : 0;
    if (ti.offset > avail || ti.nbytes > avail - ti.offset)
      throw Error(strfmt("%s: tensor '%s' data [%llu, +%zu) extends past the end of the file (data section has %zu bytes); file truncated?",
                         path_.c_str(), ti.name.c_str(), (unsigned long long)ti.offset, ti.nbytes, avail));
    ti.data = base_ + data_start + ti.offset;
  }
}

const GgufValue* GgufFile::find(std::string_view key) const {
  for (const auto& [k, v] : kv_)
    if (k == key) return &v;
  return nullptr;
}

std::optional<int64_t> GgufFile::get_int(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  SPC_CHECK(v->is_int(), "%s: metadata '%.*s' should be an integer, found %s", path_.c_str(), (int)key.size(), key.data(),
            gguf_type_name(v->type));
  return v->i;
}

std::optional<double> GgufFile::get_float(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (v->is_int()) return (double)v->i;
  SPC_CHECK(v->is_float(), "%s: metadata '%.*s' should be a number, found %s", path_.c_str(), (int)key.size(), key.data(),
            gguf_type_name(v->type));
  return v->f;
}

std::optional<bool> GgufFile::get_bool(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  SPC_CHECK(v->type == GgufType::BOOL, "%s: metadata '%.*s' should be a bool, found %s", path_.c_str(), (int)key.size(),
            key.data(), gguf_type_name(v->type));
  return v->u != 0;
}

std::optional<std::string> GgufFile::get_string(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  SPC_CHECK(v->type == GgufType::STRING, "%s: metadata '%.*s' should be a string, found %s", path_.c_str(),
            (int)key.size(), key.data(), gguf_type_name(v->type));
  return std::string(v->str);
}

std::vector<std::string_view> GgufFile::get_string_array(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return {};
  SPC_CHECK(v->type == GgufType::ARRAY && v->arr_type == GgufType::STRING, "%s: metadata '%.*s' should be a string array",
            path_.c_str(), (int)key.size(), key.data());
  return v->arr_str;
}

std::vector<float> GgufFile::get_f32_array(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return {};
  SPC_CHECK(v->type == GgufType::ARRAY && v->arr_type == GgufType::FLOAT32, "%s: metadata '%.*s' should be a float32 array",
            path_.c_str(), (int)key.size(), key.data());
  std::vector<float> out(v->arr_n);
  if (v->arr_n) std::memcpy(out.data(), v->arr_data, v->arr_n * 4);
  return out;
}

std::vector<int32_t> GgufFile::get_i32_array(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return {};
  SPC_CHECK(v->type == GgufType::ARRAY && (v->arr_type == GgufType::INT32 || v->arr_type == GgufType::UINT32),
            "%s: metadata '%.*s' should be an int32 array", path_.c_str(), (int)key.size(), key.data());
  std::vector<int32_t> out(v->arr_n);
  if (v->arr_n) std::memcpy(out.data(), v->arr_data, v->arr_n * 4);
  return out;
}

const GgufTensorInfo* GgufFile::find_tensor(std::string_view name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

}  // namespace spc
