// Robustness of the GGUF reader and the model loader against malformed files: every truncation of
// stories260K's header region, seeded random corruptions of it, hand-built malicious GGUFs, and
// files that are not GGUFs at all. Every case must either load or throw spc::Error whose message
// names the file; nothing may crash, hang or allocate absurd amounts of memory.
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "engine/tokenizer.h"
#include "gguf/gguf.h"
#include "model/model.h"
#include "test_util.h"
#include "util/error.h"

using namespace spc;
namespace fs = std::filesystem;

namespace {

std::string stories_path() { return shared_path("models/stories260K/stories260K.gguf"); }

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), (std::streamsize)bytes.size());
  ASSERT_TRUE(out.good()) << path;
}

// A per-test scratch directory, removed at the end.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("specache_gguf_robust_" + std::to_string(getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string file(const std::string& name) const { return (dir_ / name).string(); }

 private:
  fs::path dir_;
};

enum class Outcome { Loaded, Rejected, WrongException };

// Model::load (which opens the GGUF first), then the tokenizer when the model loads. A rejection
// must be an spc::Error naming the path; `what` collects the message for the caller's checks.
Outcome try_load(const std::string& path, std::string* what = nullptr, bool tokenizer = true) {
  try {
    auto m = Model::load(path);
    if (tokenizer) {
      auto tok = Tokenizer::from_gguf(m->gguf());
      (void)tok->encode("Hello world", true, true);
    }
    return Outcome::Loaded;
  } catch (const spc::Error& e) {
    if (what) *what = e.what();
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << "message does not name the file: " << e.what();
    return Outcome::Rejected;
  } catch (const std::exception& e) {
    ADD_FAILURE() << path << ": threw a non-spc::Error exception: " << e.what();
    return Outcome::WrongException;
  }
}

// The GGUF reader alone (for files that are valid GGUFs but not models).
Outcome try_open(const std::string& path, std::string* what = nullptr) {
  try {
    auto f = GgufFile::open(path);
    return Outcome::Loaded;
  } catch (const spc::Error& e) {
    if (what) *what = e.what();
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << "message does not name the file: " << e.what();
    return Outcome::Rejected;
  } catch (const std::exception& e) {
    ADD_FAILURE() << path << ": threw a non-spc::Error exception: " << e.what();
    return Outcome::WrongException;
  }
}

// Byte offset where a GGUF's tensor data section starts (end of metadata + tensor infos + padding):
// the mapping's base is not exposed, so locate the largest tensor's bytes in the file.
size_t data_section_start(const std::string& path) {
  auto f = GgufFile::open(path);
  const std::string bytes = read_all(path);
  const GgufTensorInfo* big = &f->tensors().front();
  for (const auto& t : f->tensors())
    if (t.nbytes > big->nbytes) big = &t;
  const std::string_view needle(static_cast<const char*>(big->data), big->nbytes);
  for (size_t p = 0; p + needle.size() <= bytes.size(); p += f->alignment())
    if (std::string_view(bytes).substr(p, needle.size()) == needle) return p - big->offset;
  ADD_FAILURE() << "tensor data of " << big->name << " not found in " << path;
  return 0;
}

uint64_t peak_rss_kib() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return (uint64_t)ru.ru_maxrss;
}

// ---- a tiny GGUF writer ---------------------------------------------------------------------------

struct Bytes {
  std::string b;
  Bytes& u8(uint8_t v) { b.push_back((char)v); return *this; }
  Bytes& u32(uint32_t v) { b.append(reinterpret_cast<const char*>(&v), 4); return *this; }
  Bytes& u64(uint64_t v) { b.append(reinterpret_cast<const char*>(&v), 8); return *this; }
  Bytes& f32(float v) { b.append(reinterpret_cast<const char*>(&v), 4); return *this; }
  Bytes& str(const std::string& s) { u64(s.size()); b += s; return *this; }
  Bytes& raw(const std::string& s) { b += s; return *this; }
};

struct KvEntry {
  std::string key;
  uint32_t type;
  std::string payload;  // the encoded value (after the type)
};

struct TensorEntry {
  std::string name;
  std::vector<uint64_t> dims;
  uint32_t type = 0;  // F32
  uint64_t offset = 0;
  uint64_t nbytes = 0;
};

struct GgufBuilder {
  uint32_t magic = 0x46554747, version = 3;
  std::optional<uint64_t> n_kv_override, n_tensors_override;
  std::vector<KvEntry> kv;
  std::vector<TensorEntry> tensors;
  uint64_t alignment = 32;
  std::string data;
  std::optional<uint64_t> truncate_to;

  static std::string enc_u32(uint32_t v) { return Bytes().u32(v).b; }
  static std::string enc_f32(float v) { return Bytes().f32(v).b; }
  static std::string enc_str(const std::string& s) { return Bytes().str(s).b; }

  GgufBuilder& set(const std::string& key, uint32_t type, std::string payload) {
    for (auto& e : kv)
      if (e.key == key) {
        e.type = type;
        e.payload = std::move(payload);
        return *this;
      }
    kv.push_back({key, type, std::move(payload)});
    return *this;
  }
  GgufBuilder& set_u32(const std::string& key, uint32_t v) { return set(key, 4, enc_u32(v)); }
  GgufBuilder& set_str(const std::string& key, const std::string& v) { return set(key, 8, enc_str(v)); }
  TensorEntry* tensor(const std::string& name) {
    for (auto& t : tensors)
      if (t.name == name) return &t;
    return nullptr;
  }

  // F32 tensor with deterministic small values, appended to the data section at the next aligned offset.
  void add_f32(const std::string& name, std::vector<uint64_t> dims) {
    uint64_t n = 1;
    for (uint64_t d : dims) n *= d;
    while (data.size() % alignment) data.push_back(0);
    TensorEntry t{name, dims, 0, data.size(), n * 4};
    for (uint64_t i = 0; i < n; ++i) {
      const float v = 0.01f * (float)((i * 7 + name.size()) % 13) - 0.06f;
      data.append(reinterpret_cast<const char*>(&v), 4);
    }
    tensors.push_back(t);
  }

  std::string build() const {
    Bytes o;
    o.u32(magic).u32(version).u64(n_tensors_override.value_or(tensors.size())).u64(n_kv_override.value_or(kv.size()));
    for (const auto& e : kv) o.str(e.key).u32(e.type).raw(e.payload);
    for (const auto& t : tensors) {
      o.str(t.name).u32((uint32_t)t.dims.size());
      for (uint64_t d : t.dims) o.u64(d);
      o.u32(t.type).u64(t.offset);
    }
    while (o.b.size() % alignment) o.u8(0);
    o.raw(data);
    if (truncate_to) o.b.resize(*truncate_to);
    return o.b;
  }
};

// A minimal llama model that loads: 1 layer, n_embd 32, 4 heads of 8, n_ff 32, 16-token vocabulary.
GgufBuilder tiny_llama() {
  GgufBuilder g;
  g.set_str("general.architecture", "llama");
  g.set_u32("llama.embedding_length", 32);
  g.set_u32("llama.block_count", 1);
  g.set_u32("llama.attention.head_count", 4);
  g.set_u32("llama.attention.head_count_kv", 4);
  g.set_u32("llama.feed_forward_length", 32);
  g.set_u32("llama.context_length", 64);
  g.add_f32("token_embd.weight", {32, 16});
  g.add_f32("output_norm.weight", {32});
  g.add_f32("output.weight", {32, 16});
  g.add_f32("blk.0.attn_norm.weight", {32});
  g.add_f32("blk.0.ffn_norm.weight", {32});
  for (const char* m : {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"})
    g.add_f32(std::string("blk.0.") + m + ".weight", {32, 32});
  return g;
}

}  // namespace

// ---- (a) truncations --------------------------------------------------------------------------

TEST(GgufRobust, EveryTruncationOfTheHeaderIsRejectedWithThePath) {
  SKIP_IF_MISSING(stories_path());
  const std::string full = read_all(stories_path());
  const size_t header_end = data_section_start(stories_path());
  ASSERT_GT(header_end, 24u);
  ASSERT_LT(header_end, full.size());
  TempDir tmp;
  const std::string path = tmp.file("trunc.gguf");
  write_all(path, full.substr(0, header_end));
  // Shrink one byte at a time: every prefix [0, header_end] of the header region.
  int rejected = 0;
  for (size_t len = header_end + 1; len-- > 0;) {
    ASSERT_EQ(truncate(path.c_str(), (off_t)len), 0);
    std::string what;
    const Outcome o = try_load(path, &what);
    ASSERT_EQ(o, Outcome::Rejected) << "prefix of " << len << " bytes";
    ++rejected;
    if (len >= 8 && len < header_end) {
      const bool says_short = what.find("truncated") != std::string::npos ||
                              what.find("fit in the file") != std::string::npos ||
                              what.find("remain") != std::string::npos;
      EXPECT_TRUE(says_short) << len << ": " << what;
    }
  }
  EXPECT_EQ(rejected, (int)header_end + 1);
}

TEST(GgufRobust, LongerTruncationsAreRejectedAndTheFullFileLoads) {
  SKIP_IF_MISSING(stories_path());
  const std::string full = read_all(stories_path());
  const size_t header_end = data_section_start(stories_path());
  TempDir tmp;
  const std::string path = tmp.file("trunc.gguf");
  write_all(path, full);
  ASSERT_EQ(try_load(path), Outcome::Loaded);
  // A sample of prefixes inside the tensor data, longest first (truncate only shrinks).
  std::vector<size_t> lens;
  for (size_t len = full.size() - 1; len > header_end; len -= std::max<size_t>(1, (len - header_end) / 40)) lens.push_back(len);
  for (size_t k = 1; k <= 64; ++k) lens.push_back(header_end + k);
  std::sort(lens.rbegin(), lens.rend());
  lens.erase(std::unique(lens.begin(), lens.end()), lens.end());
  for (size_t len : lens) {
    ASSERT_EQ(truncate(path.c_str(), (off_t)len), 0);
    std::string what;
    ASSERT_EQ(try_load(path, &what), Outcome::Rejected) << "prefix of " << len << " bytes";
    EXPECT_NE(what.find("past the end"), std::string::npos) << what;
  }
}

// ---- (b) seeded random corruptions of the header region -----------------------------------------

TEST(GgufRobust, RandomHeaderCorruptionsLoadOrFailCleanly) {
  SKIP_IF_MISSING(stories_path());
  const std::string full = read_all(stories_path());
  const size_t header_end = data_section_start(stories_path());
  TempDir tmp;
  const std::string path = tmp.file("corrupt.gguf");
  write_all(path, full);
  const int fd = ::open(path.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  std::mt19937_64 rng(0x5eca11e);
  const uint64_t specials[] = {0, 1, 2, 3, 4, 5, 0x7f, 0x80, 0xff, 0xffff, 0xffffffffull, 0x80000000ull,
                               1ull << 31, 1ull << 32, 1ull << 40, 1ull << 62, 1ull << 63, ~0ull, ~0ull - 7};
  int loaded = 0, rejected = 0;
  const uint64_t rss0 = peak_rss_kib();
  for (int iter = 0; iter < 3000; ++iter) {
    const size_t pos = (size_t)(rng() % header_end);
    size_t n = 1;
    std::string patch;
    switch (iter % 4) {
      case 0:  // one random byte
        patch.push_back((char)(rng() & 0xff));
        break;
      case 1:  // one bit flip
        patch.push_back((char)(full[pos] ^ (1 << (rng() % 8))));
        break;
      case 2: {  // 2..8 random bytes
        n = 2 + rng() % 7;
        for (size_t k = 0; k < n; ++k) patch.push_back((char)(rng() & 0xff));
        break;
      }
      default: {  // a special 4- or 8-byte value (lengths, counts, types, dims, offsets)
        const uint64_t v = specials[rng() % (sizeof(specials) / sizeof(specials[0]))];
        n = (rng() & 1) ? 8 : 4;
        patch.assign(reinterpret_cast<const char*>(&v), n);
        break;
      }
    }
    n = std::min(n, header_end - pos);
    patch.resize(n);
    ASSERT_EQ(pwrite(fd, patch.data(), n, (off_t)pos), (ssize_t)n);
    const Outcome o = try_load(path);
    ASSERT_NE(o, Outcome::WrongException) << "iteration " << iter << ", " << n << " bytes at offset " << pos;
    (o == Outcome::Loaded ? loaded : rejected)++;
    ASSERT_EQ(pwrite(fd, full.data() + pos, n, (off_t)pos), (ssize_t)n);  // restore
  }
  ::close(fd);
  EXPECT_GT(rejected, 100);
  EXPECT_GT(loaded, 100);  // most corruptions of string bytes and float scores still load
  // No case may have allocated absurd amounts (peak RSS of the whole process grows by < 512 MiB).
  EXPECT_LT(peak_rss_kib() - rss0, 512u * 1024u);
}

// ---- (c) hand-built malicious GGUFs ---------------------------------------------------------------

class GgufRobustBuilt : public ::testing::Test {
 protected:
  TempDir tmp_;
  int n_ = 0;
  std::string write(const GgufBuilder& g) {
    const std::string path = tmp_.file("case" + std::to_string(n_++) + ".gguf");
    write_all(path, g.build());
    return path;
  }
  // The built file must be rejected by the GGUF reader itself with a message containing `keyword`.
  void expect_reader_rejects(const GgufBuilder& g, const std::string& keyword) {
    const std::string path = write(g);
    std::string what;
    ASSERT_EQ(try_open(path, &what), Outcome::Rejected) << "expected a rejection mentioning '" << keyword << "'";
    EXPECT_NE(what.find(keyword), std::string::npos) << what;
    EXPECT_EQ(try_load(path), Outcome::Rejected);
  }
  // The GGUF parses but Model::load rejects it with `keyword`.
  void expect_model_rejects(const GgufBuilder& g, const std::string& keyword) {
    const std::string path = write(g);
    ASSERT_EQ(try_open(path), Outcome::Loaded);
    std::string what;
    ASSERT_EQ(try_load(path, &what, false), Outcome::Rejected) << "expected a rejection mentioning '" << keyword << "'";
    EXPECT_NE(what.find(keyword), std::string::npos) << what;
  }
};

TEST_F(GgufRobustBuilt, TheTinyModelLoads) {
  const std::string path = write(tiny_llama());
  ASSERT_EQ(try_load(path, nullptr, false), Outcome::Loaded);
  auto m = Model::load(path);
  EXPECT_EQ(m->config().n_vocab, 16);
  EXPECT_EQ(m->config().head_dim, 8);
  EXPECT_EQ(m->gguf().tensors().size(), 12u);
}

TEST_F(GgufRobustBuilt, BadMagicAndVersions) {
  auto g = tiny_llama();
  g.magic = 0x46554746;
  expect_reader_rejects(g, "not a GGUF file");
  for (uint32_t v : {0u, 1u, 4u, 0xffffffffu}) {
    auto h = tiny_llama();
    h.version = v;
    expect_reader_rejects(h, "unsupported GGUF version");
  }
  auto v2 = tiny_llama();
  v2.version = 2;
  EXPECT_EQ(try_load(write(v2), nullptr, false), Outcome::Loaded);
}

TEST_F(GgufRobustBuilt, HugeCounts) {
  auto g = tiny_llama();
  g.n_kv_override = 1ull << 60;
  expect_reader_rejects(g, "metadata count");
  g = tiny_llama();
  g.n_tensors_override = ~0ull;
  expect_reader_rejects(g, "tensor count");
  g = tiny_llama();
  g.n_kv_override = g.kv.size() + 1;  // one entry more than written: runs into the tensor infos
  const std::string path = write(g);
  EXPECT_EQ(try_load(path), Outcome::Rejected);
}

TEST_F(GgufRobustBuilt, HugeStringLengths) {
  auto g = tiny_llama();
  g.set("general.name", 8, Bytes().u64(1ull << 62).raw("abc").b);
  expect_reader_rejects(g, "length");
  g = tiny_llama();
  g.set("general.name", 8, Bytes().u64(~0ull).b);
  expect_reader_rejects(g, "length");
  // A key whose length is absurd.
  g = tiny_llama();
  g.kv.insert(g.kv.begin(), KvEntry{"", 4, GgufBuilder::enc_u32(1)});
  std::string bytes = g.build();
  const uint64_t huge = 1ull << 61;
  std::memcpy(&bytes[24], &huge, 8);  // the first key's length field
  const std::string path = tmp_.file("hugekey.gguf");
  write_all(path, bytes);
  std::string what;
  ASSERT_EQ(try_open(path, &what), Outcome::Rejected);
  EXPECT_NE(what.find("length"), std::string::npos) << what;
  // A tensor name whose length is absurd.
  g = tiny_llama();
  g.tensors[0].name = std::string(1000, 'x');
  bytes = g.build();
  const size_t name_pos = bytes.find(std::string(1000, 'x'));
  ASSERT_NE(name_pos, std::string::npos);
  std::memcpy(&bytes[name_pos - 8], &huge, 8);
  write_all(path, bytes);
  ASSERT_EQ(try_open(path, &what), Outcome::Rejected);
  EXPECT_NE(what.find("tensor name"), std::string::npos) << what;
}

TEST_F(GgufRobustBuilt, HugeArrayCounts) {
  for (uint32_t elem : {0u, 4u, 6u, 10u, 12u}) {  // u8, u32, f32, u64, f64
    auto g = tiny_llama();
    g.set("test.array", 9, Bytes().u32(elem).u64(1ull << 61).u32(0).b);
    expect_reader_rejects(g, "does not fit");
  }
  auto g = tiny_llama();
  g.set("tokenizer.ggml.tokens", 9, Bytes().u32(8).u64(~0ull >> 1).str("a").b);
  expect_reader_rejects(g, "does not fit");
  g = tiny_llama();
  g.set("tokenizer.ggml.tokens", 9, Bytes().u32(8).u64(3).str("a").str("b").u64(1ull << 50).b);  // 3rd string too long
  expect_reader_rejects(g, "length");
  g = tiny_llama();
  g.set("test.nested", 9, Bytes().u32(9).u64(1ull << 58).b);
  expect_reader_rejects(g, "does not fit");
  // Arrays nested 6 deep.
  Bytes deep;
  for (int d = 0; d < 6; ++d) deep.u32(9).u64(1);
  deep.u32(4).u64(0);
  g = tiny_llama();
  g.set("test.deep", 9, deep.b);
  expect_reader_rejects(g, "nested");
}

TEST_F(GgufRobustBuilt, UnknownValueTypesAndBadBools) {
  for (uint32_t t : {13u, 100u, 0xffffffffu}) {
    auto g = tiny_llama();
    g.set("test.value", t, GgufBuilder::enc_u32(0));
    expect_reader_rejects(g, "invalid metadata value type");
    g = tiny_llama();
    g.set("test.array", 9, Bytes().u32(t).u64(1).u32(0).b);
    expect_reader_rejects(g, "invalid metadata value type");
  }
  auto g = tiny_llama();
  g.set("test.flag", 7, Bytes().u8(2).b);
  expect_reader_rejects(g, "bool");
}

TEST_F(GgufRobustBuilt, DuplicateKeysAndTensorNames) {
  auto g = tiny_llama();
  g.kv.push_back({"llama.block_count", 4, GgufBuilder::enc_u32(1)});
  expect_reader_rejects(g, "duplicate metadata key");
  g = tiny_llama();
  g.tensors[1].name = g.tensors[0].name;
  expect_reader_rejects(g, "duplicate tensor name");
}

TEST_F(GgufRobustBuilt, BadDimensionCounts) {
  for (size_t nd : {0u, 5u}) {
    auto g = tiny_llama();
    g.tensors[0].dims.assign(nd, 1);
    expect_reader_rejects(g, "dimensions");
  }
  auto g = tiny_llama();
  std::string bytes = g.build();
  const size_t p = bytes.find("token_embd.weight") + std::strlen("token_embd.weight");
  const uint32_t huge = 0xffffffffu;
  std::memcpy(&bytes[p], &huge, 4);
  const std::string path = tmp_.file("nd.gguf");
  write_all(path, bytes);
  std::string what;
  ASSERT_EQ(try_open(path, &what), Outcome::Rejected);
  EXPECT_NE(what.find("dimensions"), std::string::npos) << what;
}

TEST_F(GgufRobustBuilt, OverflowingAndZeroDimensions) {
  const std::vector<std::vector<uint64_t>> bad = {
      {0, 16}, {32, 0}, {1ull << 41, 1}, {~0ull, 1}, {1ull << 63, 2}, {1ull << 40, 1ull << 40},
      {1ull << 20, 1ull << 20, 1ull << 20}, {1ull << 16, 1ull << 16, 1ull << 16, 1ull << 16}};
  for (const auto& dims : bad) {
    auto g = tiny_llama();
    g.tensors[0].dims = dims;
    const std::string path = write(g);
    std::string what;
    ASSERT_EQ(try_open(path, &what), Outcome::Rejected);
    EXPECT_TRUE(what.find("dimension") != std::string::npos || what.find("too many elements") != std::string::npos)
        << what;
  }
  // Large but representable: data must fit in the file.
  auto g = tiny_llama();
  g.tensors[0].dims = {1ull << 20, 1ull << 20};
  expect_reader_rejects(g, "past the end");
}

TEST_F(GgufRobustBuilt, BadTensorOffsets) {
  auto g = tiny_llama();
  g.tensors.back().offset = 1ull << 40;
  expect_reader_rejects(g, "past the end");
  g = tiny_llama();
  g.tensors.back().offset = ~0ull - 31;  // aligned, and offset + nbytes overflows
  expect_reader_rejects(g, "past the end");
  g = tiny_llama();
  g.tensors.back().offset += g.alignment;  // aligned but runs one block past the end
  expect_reader_rejects(g, "past the end");
  g = tiny_llama();
  g.tensors[3].offset += 4;
  expect_reader_rejects(g, "alignment");
  g = tiny_llama();
  g.truncate_to = g.build().size() - 1;
  expect_reader_rejects(g, "past the end");
}

TEST_F(GgufRobustBuilt, UnknownAndUnsupportedTensorTypes) {
  for (uint32_t t : {4u, 5u, 16u, 29u, 31u, 1000u, 0xffffffffu}) {
    auto g = tiny_llama();
    g.tensors[0].type = t;
    expect_reader_rejects(g, "unknown or unsupported type");
  }
  // Known to the reader but not computable (Q8_1: 32-element blocks of 36 bytes).
  auto g = tiny_llama();
  g.tensors.back().type = 9;
  expect_model_rejects(g, "cannot compute with");
  // A block type whose row length is not a multiple of the block size.
  g = tiny_llama();
  g.tensors[1].type = 12;  // Q4_K, 256-element blocks, row of 32
  expect_reader_rejects(g, "block size");
}

TEST_F(GgufRobustBuilt, BadAlignment) {
  for (uint32_t a : {0u, 3u, 48u, 1u << 20}) {
    auto g = tiny_llama();
    g.set_u32("general.alignment", a);
    expect_reader_rejects(g, "alignment");
  }
  auto g = tiny_llama();
  g.set_str("general.alignment", "32");
  expect_reader_rejects(g, "alignment");
  g = tiny_llama();
  g.set("general.alignment", 5, Bytes().u32((uint32_t)-32).b);  // int32 -32
  expect_reader_rejects(g, "alignment");
}

TEST_F(GgufRobustBuilt, BadHyperParameters) {
  auto g = tiny_llama();
  g.set_str("general.architecture", "gpt-j");
  expect_model_rejects(g, "unsupported architecture");
  g = tiny_llama();
  g.set_u32("general.architecture", 1);
  expect_model_rejects(g, "should be a string");
  g = tiny_llama();
  g.kv.erase(g.kv.begin() + 1);  // embedding_length
  expect_model_rejects(g, "missing metadata 'llama.embedding_length'");
  g = tiny_llama();
  g.set_u32("llama.attention.head_count_kv", 0);
  expect_model_rejects(g, "out of range");
  g = tiny_llama();
  g.set_u32("llama.attention.head_count_kv", 3);
  expect_model_rejects(g, "multiple");
  g = tiny_llama();
  g.set_u32("llama.attention.head_count", 64);  // more heads than embedding dims: head_dim 0
  g.set_u32("llama.attention.head_count_kv", 64);
  expect_model_rejects(g, "head dimension");
  g = tiny_llama();
  g.set_str("llama.block_count", "1");
  expect_model_rejects(g, "should be an integer");
  g = tiny_llama();
  g.set("llama.context_length", 5, Bytes().u32((uint32_t)-1).b);
  expect_model_rejects(g, "context_length");
  g = tiny_llama();
  g.set_str("llama.rope.scaling.type", "yarn");
  expect_model_rejects(g, "RoPE scaling");
}

TEST_F(GgufRobustBuilt, MissingAndMisshapenTensors) {
  auto g = tiny_llama();
  g.tensors.erase(g.tensors.begin() + 4);  // blk.0.ffn_norm.weight
  expect_model_rejects(g, "missing tensor 'blk.0.ffn_norm.weight'");
  g = tiny_llama();
  g.tensor("blk.0.attn_q.weight")->dims = {32, 16, 2};
  expect_model_rejects(g, "has shape");
  g = tiny_llama();
  g.tensor("token_embd.weight")->dims = {16, 32};
  expect_model_rejects(g, "token_embd.weight");
  g = tiny_llama();
  g.tensor("output_norm.weight")->dims = {16};
  expect_model_rejects(g, "elements");
}

TEST_F(GgufRobustBuilt, HugeLayerCountFailsFastWithoutAllocating) {
  const uint64_t rss0 = peak_rss_kib();
  for (uint32_t n : {2u, 1000u, 1u << 24}) {
    auto g = tiny_llama();
    g.set_u32("llama.block_count", n);
    expect_model_rejects(g, "missing tensor 'blk.1.");
  }
  auto g = tiny_llama();
  g.set_u32("llama.block_count", (1u << 24) + 1);
  expect_model_rejects(g, "out of range");
  EXPECT_LT(peak_rss_kib() - rss0, 256u * 1024u);
}

// ---- (d) not GGUFs at all ----------------------------------------------------------------------------

TEST(GgufRobust, NonGgufEmptyDirectoryAndMissingPaths) {
  TempDir tmp;
  std::string what;
  const std::string text = tmp.file("notes.txt");
  write_all(text, "This is a text file, not a model.\nIt has a few lines.\n");
  EXPECT_EQ(try_load(text, &what), Outcome::Rejected);
  EXPECT_NE(what.find("not a GGUF file"), std::string::npos) << what;

  const std::string empty = tmp.file("empty.gguf");
  write_all(empty, "");
  EXPECT_EQ(try_load(empty, &what), Outcome::Rejected);
  EXPECT_NE(what.find("not a GGUF file"), std::string::npos) << what;

  const std::string tiny = tmp.file("magic_only.gguf");
  write_all(tiny, "GGUF");
  EXPECT_EQ(try_load(tiny, &what), Outcome::Rejected);

  const std::string header_only = tmp.file("header_only.gguf");
  write_all(header_only, Bytes().u32(0x46554747).u32(3).b);
  EXPECT_EQ(try_load(header_only, &what), Outcome::Rejected);
  EXPECT_NE(what.find("truncated"), std::string::npos) << what;

  const std::string dir = tmp.file("adir.gguf");
  fs::create_directories(dir);
  EXPECT_EQ(try_load(dir, &what), Outcome::Rejected);
  EXPECT_NE(what.find("not a regular file"), std::string::npos) << what;

  const std::string missing = tmp.file("does/not/exist.gguf");
  EXPECT_EQ(try_load(missing, &what), Outcome::Rejected);
  EXPECT_NE(what.find("cannot open"), std::string::npos) << what;

  // A valid GGUF that is not a model (vocabulary only, 0 tensors): the reader accepts it, the loader does not.
  const std::string vocab = shared_path("models/llama.cpp-vocab/ggml-vocab-llama-spm.gguf");
  if (fs::exists(vocab)) {
    EXPECT_EQ(try_open(vocab), Outcome::Loaded);
    EXPECT_EQ(try_load(vocab, &what), Outcome::Rejected);
  }
}
