// GGUF reader (versions 2 and 3): memory-maps the file, parses metadata and tensor infos with
// every length and offset bounds-checked. Malformed files throw spc::Error naming the file.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/dtype.h"

namespace spc {

enum class GgufType : uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6,
  BOOL = 7, STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};
const char* gguf_type_name(GgufType t);

// One metadata value. Scalars are decoded; arrays keep a pointer into the mapping
// (numeric elements are read with memcpy, the mapping may be unaligned) or string views.
struct GgufValue {
  GgufType type = GgufType::UINT8;
  // Scalars: integers in i (signed) / u (unsigned), floats in f, strings in str.
  int64_t i = 0;
  uint64_t u = 0;
  double f = 0;
  std::string_view str;
  // Arrays.
  GgufType arr_type = GgufType::UINT8;
  uint64_t arr_n = 0;
  const uint8_t* arr_data = nullptr;       // numeric arrays: arr_n packed elements
  std::vector<std::string_view> arr_str;   // string arrays

  bool is_int() const;
  bool is_float() const { return type == GgufType::FLOAT32 || type == GgufType::FLOAT64; }
  // Short printable form (arrays summarized).
  std::string to_string() const;
};

struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::F32;
  int n_dims = 0;
  int64_t ne[4] = {1, 1, 1, 1};  // ne[0] is the contiguous (row) dimension
  uint64_t offset = 0;           // relative to the data section
  const void* data = nullptr;    // into the mapping
  size_t nbytes = 0;
  int64_t n_elements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
  std::string shape_string() const;
};

class GgufFile {
 public:
  // Maps and parses `path`. Throws spc::Error("<path>: <what is wrong>") on any problem.
  static std::unique_ptr<GgufFile> open(const std::string& path);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  size_t file_size() const { return size_; }
  size_t alignment() const { return alignment_; }

  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  const GgufValue* find(std::string_view key) const;

  // Typed accessors: nullopt when the key is absent; spc::Error when present with a wrong type.
  std::optional<int64_t> get_int(std::string_view key) const;
  std::optional<double> get_float(std::string_view key) const;  // accepts integers too
  std::optional<bool> get_bool(std::string_view key) const;
  std::optional<std::string> get_string(std::string_view key) const;
  // Arrays: empty when absent; spc::Error on a wrong element type.
  std::vector<std::string_view> get_string_array(std::string_view key) const;
  std::vector<float> get_f32_array(std::string_view key) const;
  std::vector<int32_t> get_i32_array(std::string_view key) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* find_tensor(std::string_view name) const;

  // Drops the whole pages inside [p, p + n) (a range of this file's mapping) from the process's
  // resident memory (madvise MADV_DONTNEED): for tensors the caller no longer reads, e.g. copied
  // into another layout. Reading them again later is still valid (the pages fault back in from
  // the page cache). Best effort: a failing madvise is ignored.
  void release_pages(const void* p, size_t n) const;

 private:
  GgufFile() = default;
  void parse();

  std::string path_;
  int fd_ = -1;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  uint32_t version_ = 0;
  size_t alignment_ = 32;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<GgufTensorInfo> tensors_;
};

}  // namespace spc
