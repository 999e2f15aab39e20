#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <unistd.h>

#include "engine/tokenizer.h"
#include "gguf/gguf.h"
#include "test_util.h"
#include "util/error.h"

using namespace spc;

namespace {

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

struct Vector {
  std::string text;
  std::vector<int32_t> ids;
};

// llama.cpp's test-tokenizer-0 format: the .inp file is split at every "\n__ggml_vocab_test__\n" (the
// newline before the marker belongs to the separator; the file ends with a separator), the .out file
// has one line of space-separated ids per string.
std::vector<Vector> read_vectors(const std::string& gguf_path) {
  const std::string inp = read_all(gguf_path + ".inp");
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  for (size_t pos = 0; pos < inp.size();) {
    const size_t next = inp.find(sep, pos);
    if (next == std::string::npos) {
      texts.push_back(inp.substr(pos));
      break;
    }
    texts.push_back(inp.substr(pos, next - pos));
    pos = next + sep.size();
  }
  std::ifstream out(gguf_path + ".out");
  std::vector<Vector> v;
  size_t i = 0;
  for (std::string line; std::getline(out, line); ++i) {
    Vector t;
    if (i < texts.size()) t.text = texts[i];
    std::istringstream ls(line);
    for (int32_t id; ls >> id;) t.ids.push_back(id);
    v.push_back(std::move(t));
  }
  EXPECT_EQ(texts.size(), v.size()) << gguf_path << ": .inp and .out have different numbers of tests";
  return v;
}

std::string ids_str(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids) s += std::to_string(id) + " ";
  return s;
}

void check_vocab_vectors(const std::string& name) {
  const std::string path = shared_path("models/llama.cpp-vocab/" + name);
  SKIP_IF_MISSING(path);
  auto f = GgufFile::open(path);
  auto tok = Tokenizer::from_gguf(*f);
  const auto vectors = read_vectors(path);
  ASSERT_EQ(vectors.size(), 46u);
  int pass = 0, roundtrip = 0;
  for (const auto& v : vectors) {
    // As llama.cpp's test: no BOS, parse_special = false.
    const auto got = tok->encode(v.text, /*add_bos=*/false, /*parse_special=*/false);
    if (got == v.ids) ++pass;
    EXPECT_EQ(ids_str(got), ids_str(v.ids)) << name << " text: '" << v.text << "'";
    const std::string back = tok->decode(got);
    if (back == v.text) ++roundtrip;
    EXPECT_EQ(back, v.text) << name << ": decode(encode(s)) != s";
  }
  std::printf("[ %s ] %d/%zu vectors match, %d/%zu round-trip\n", name.c_str(), pass, vectors.size(), roundtrip,
              vectors.size());
}

// ---- minimal GGUF writer for metadata-only files ----
struct GgufWriter {
  std::string kv;
  uint64_t n = 0;
  void raw(const void* p, size_t len) { kv.append((const char*)p, len); }
  template <typename T>
  void pod(T v) { raw(&v, sizeof v); }
  void str(const std::string& s) {
    pod<uint64_t>(s.size());
    kv += s;
  }
  void key(const std::string& k, uint32_t type) {
    ++n;
    str(k);
    pod<uint32_t>(type);
  }
  void add_string(const std::string& k, const std::string& v) {
    key(k, 8);
    str(v);
  }
  void add_u32(const std::string& k, uint32_t v) {
    key(k, 4);
    pod(v);
  }
  void add_bool(const std::string& k, bool v) {
    key(k, 7);
    pod<uint8_t>(v);
  }
  void add_strings(const std::string& k, const std::vector<std::string>& v) {
    key(k, 9);
    pod<uint32_t>(8);
    pod<uint64_t>(v.size());
    for (const auto& s : v) str(s);
  }
  void add_f32s(const std::string& k, const std::vector<float>& v) {
    key(k, 9);
    pod<uint32_t>(6);
    pod<uint64_t>(v.size());
    for (float x : v) pod(x);
  }
  void add_i32s(const std::string& k, const std::vector<int32_t>& v) {
    key(k, 9);
    pod<uint32_t>(5);
    pod<uint64_t>(v.size());
    for (int32_t x : v) pod(x);
  }
  std::string write(const std::string& name) const {
    const std::string path = (std::filesystem::temp_directory_path() /
                              ("specache_tok_" + std::to_string(::getpid()) + "_" + name + ".gguf")).string();
    std::string out = "GGUF";
    auto put = [&](const void* p, size_t len) { out.append((const char*)p, len); };
    const uint32_t version = 3;
    const uint64_t n_tensors = 0;
    put(&version, 4);
    put(&n_tensors, 8);
    put(&n, 8);
    out += kv;
    while (out.size() % 32) out += '\0';
    std::ofstream(path, std::ios::binary) << out;
    return path;
  }
};

// A tiny valid gpt2 vocabulary: bytes 'a', 'b', 'c', merges a+b, ab+c.
GgufWriter tiny_bpe() {
  GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_string("tokenizer.ggml.model", "gpt2");
  w.add_string("tokenizer.ggml.pre", "gpt-2");
  w.add_strings("tokenizer.ggml.tokens", {"a", "b", "c", "ab", "abc", "<|endoftext|>"});
  w.add_i32s("tokenizer.ggml.token_type", {1, 1, 1, 1, 1, 3});
  w.add_strings("tokenizer.ggml.merges", {"a b", "ab c"});
  w.add_u32("tokenizer.ggml.eos_token_id", 5);
  return w;
}

std::unique_ptr<Tokenizer> load(const GgufWriter& w, const std::string& name) {
  const std::string path = w.write(name);
  struct Rm {
    std::string p;
    ~Rm() { std::remove(p.c_str()); }
  } rm{path};
  auto f = GgufFile::open(path);
  return Tokenizer::from_gguf(*f);
}

void expect_error(const GgufWriter& w, const std::string& name, const std::string& fragment) {
  try {
    load(w, name);
    ADD_FAILURE() << name << ": expected spc::Error containing '" << fragment << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(TokenizerVectors, LlamaSpm) { check_vocab_vectors("ggml-vocab-llama-spm.gguf"); }
TEST(TokenizerVectors, Gpt2) { check_vocab_vectors("ggml-vocab-gpt-2.gguf"); }
TEST(TokenizerVectors, Phi3) { check_vocab_vectors("ggml-vocab-phi-3.gguf"); }

TEST(TokenizerSpm, BasicsAndSpecials) {
  const std::string path = shared_path("models/llama.cpp-vocab/ggml-vocab-llama-spm.gguf");
  SKIP_IF_MISSING(path);
  auto f = GgufFile::open(path);
  auto tok = Tokenizer::from_gguf(*f);
  EXPECT_EQ(tok->n_vocab(), 32000);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_TRUE(tok->add_bos_default());
  EXPECT_TRUE(tok->add_space_prefix());
  EXPECT_TRUE(tok->is_end_of_generation(2));
  EXPECT_FALSE(tok->is_end_of_generation(1));
  // With BOS; the text gets the '▁' prefix, so a leading space becomes a separate '▁' (29871).
  EXPECT_EQ(tok->encode("Hello World!", true, false), (std::vector<int32_t>{1, 15043, 2787, 29991}));
  EXPECT_EQ(tok->encode(" Hello World!", true, false), (std::vector<int32_t>{1, 29871, 15043, 2787, 29991}));
  EXPECT_EQ(tok->encode("", true, false), (std::vector<int32_t>{1}));
  EXPECT_EQ(tok->token_to_piece(1), "");          // control
  EXPECT_EQ(tok->token_to_piece(15043), " Hello");  // '▁Hello'
  EXPECT_EQ(tok->token_to_piece(*tok->find_token("<0x0A>")), "\n");
  EXPECT_EQ(tok->token_text(15043), "\xE2\x96\x81Hello");
  // Byte fallback for a character outside the vocabulary.
  const auto ids = tok->encode("\xF0\x9F\xA6\x99", false, false);  // 🦙
  EXPECT_EQ(ids, (std::vector<int32_t>{29871, 243, 162, 169, 156}));
  EXPECT_EQ(tok->decode(ids), "\xF0\x9F\xA6\x99");
  // Special tokens: only with parse_special; the text after one gets the space prefix again.
  EXPECT_EQ(tok->encode("<s>Hi", false, true)[0], 1);
  EXPECT_NE(tok->encode("<s>Hi", false, false)[0], 1);
  std::vector<int32_t> expect{1};
  for (int32_t id : tok->encode("Hi", false, false)) expect.push_back(id);
  EXPECT_EQ(tok->encode("<s>Hi", false, true), expect);
  EXPECT_THROW(tok->token_to_piece(32000), Error);
  EXPECT_THROW(tok->token_to_piece(-1), Error);
}

TEST(TokenizerSpm, Phi3EndOfGeneration) {
  const std::string path = shared_path("models/llama.cpp-vocab/ggml-vocab-phi-3.gguf");
  SKIP_IF_MISSING(path);
  auto f = GgufFile::open(path);
  auto tok = Tokenizer::from_gguf(*f);
  EXPECT_EQ(tok->eos_id(), 32000);
  EXPECT_TRUE(tok->is_end_of_generation(32000));        // <|endoftext|>
  EXPECT_TRUE(tok->is_end_of_generation(32007));        // <|end|>
  EXPECT_FALSE(tok->is_end_of_generation(32010));       // <|user|>
  const auto ids = tok->encode("<|user|>\nHi<|end|>", false, true);
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids.front(), 32010);
  EXPECT_EQ(ids.back(), 32007);
  EXPECT_EQ(tok->decode(ids), "\nHi");  // control tokens have no text; the prefix space is dropped
}

TEST(TokenizerBpe, Gpt2Basics) {
  const std::string path = shared_path("models/llama.cpp-vocab/ggml-vocab-gpt-2.gguf");
  SKIP_IF_MISSING(path);
  auto f = GgufFile::open(path);
  auto tok = Tokenizer::from_gguf(*f);
  EXPECT_EQ(tok->n_vocab(), 50257);
  EXPECT_FALSE(tok->add_bos_default());
  EXPECT_TRUE(tok->is_end_of_generation(50256));
  EXPECT_EQ(tok->encode("Hello world", false, false), (std::vector<int32_t>{15496, 995}));
  EXPECT_EQ(tok->token_to_piece(995), " world");  // 'Ġworld'
  EXPECT_EQ(tok->encode("<|endoftext|>", false, true), (std::vector<int32_t>{50256}));
  EXPECT_GT(tok->encode("<|endoftext|>", false, false).size(), 1u);
  // Invalid UTF-8 is replaced by U+FFFD rather than failing.
  const auto ids = tok->encode("a\xFF" "b", false, false);
  EXPECT_EQ(tok->decode(ids), "a\xEF\xBF\xBD" "b");
}

// ---- SmolLM2 (the default model) ----

class TokenizerSmolLM2 : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = default_model_path();
    if (!std::filesystem::exists(path_)) GTEST_SKIP() << "missing " << path_ << " (run scripts/setup.sh)";
    file_ = GgufFile::open(path_);
    tok_ = Tokenizer::from_gguf(*file_);
  }
  std::string path_;
  std::unique_ptr<GgufFile> file_;
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(TokenizerSmolLM2, Metadata) {
  EXPECT_EQ(tok_->kind(), Tokenizer::Kind::BPE);
  EXPECT_EQ(tok_->pre(), "smollm");
  EXPECT_EQ(tok_->n_vocab(), 49152);
  EXPECT_FALSE(tok_->add_bos_default());
  EXPECT_EQ(tok_->token_text(0), "<|endoftext|>");
  EXPECT_EQ(tok_->token_text(1), "<|im_start|>");
  EXPECT_EQ(tok_->token_text(2), "<|im_end|>");
  EXPECT_EQ(tok_->find_token("<|im_start|>"), 1);
  EXPECT_EQ(tok_->find_token("<|im_end|>"), 2);
  EXPECT_FALSE(tok_->find_token("definitely not a token").has_value());
  EXPECT_TRUE(tok_->is_end_of_generation(2));  // <|im_end|> (also the eos id)
  EXPECT_TRUE(tok_->is_end_of_generation(0));  // <|endoftext|>
  EXPECT_FALSE(tok_->is_end_of_generation(1));
  EXPECT_FALSE(tok_->is_end_of_generation(*tok_->find_token("Hello")));
}

TEST_F(TokenizerSmolLM2, SpecialTokens) {
  const std::string text = "<|im_start|>user\nHi<|im_end|>\n";
  const auto ids = tok_->encode(text, false, true);
  ASSERT_GE(ids.size(), 4u);
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 1), 1);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 2), 1);
  // Between the specials: ordinary tokenization of "user\nHi" and "\n".
  std::vector<int32_t> expect{1};
  for (int32_t id : tok_->encode("user\nHi", false, false)) expect.push_back(id);
  expect.push_back(2);
  for (int32_t id : tok_->encode("\n", false, false)) expect.push_back(id);
  EXPECT_EQ(ids, expect);
  EXPECT_EQ(tok_->decode(ids), "user\nHi\n");  // control tokens have no text
  // Without parse_special the markers are plain text.
  const auto plain = tok_->encode(text, false, false);
  EXPECT_EQ(std::count(plain.begin(), plain.end(), 1), 0);
  EXPECT_EQ(tok_->decode(plain), text);
}

TEST_F(TokenizerSmolLM2, HandChecked) {
  // smollm pre-tokenizer: every digit is its own piece.
  const auto digits = tok_->encode("1234567", false, false);
  ASSERT_EQ(digits.size(), 7u);
  for (size_t i = 0; i < 7; ++i) EXPECT_EQ(tok_->token_to_piece(digits[i]), std::string(1, (char)('1' + i)));
  // " world" is one token (Ġworld).
  const auto hw = tok_->encode("Hello world", false, false);
  ASSERT_EQ(hw.size(), 2u);
  EXPECT_EQ(tok_->token_to_piece(hw[0]), "Hello");
  EXPECT_EQ(tok_->token_to_piece(hw[1]), " world");
  for (const char* s : {"", " ", "\n\n", "caf\xC3\xA9 \xE2\x98\x95 \xE4\xBD\xA0\xE5\xA5\xBD", "a  b   c\t\td"}) {
    EXPECT_EQ(tok_->decode(tok_->encode(s, false, false)), s);
  }
}

TEST_F(TokenizerSmolLM2, MatchesHfTokenizersReference) {
  const std::string ref_path = testdata_path("smollm2_tokenizer_ref.json");
  SKIP_IF_MISSING(ref_path);
  const auto ref = nlohmann::json::parse(read_all(ref_path));
  ASSERT_GE(ref["cases"].size(), 10u);
  for (const auto& c : ref["cases"]) {
    const std::string text = c["text"].get<std::string>();
    const auto want = c["ids"].get<std::vector<int32_t>>();
    const auto got = tok_->encode(text, false, false);
    EXPECT_EQ(ids_str(got), ids_str(want)) << "text: '" << text << "'";
    EXPECT_EQ(tok_->decode(got), text);
  }
}

// ---- metadata errors ----

TEST(TokenizerErrors, TinyVocabWorks) {
  auto tok = load(tiny_bpe(), "ok");
  EXPECT_EQ(tok->encode("abc", false, false), (std::vector<int32_t>{4}));
  // a b c a b -> (a b, leftmost first) ab c a b -> ab c ab -> abc ab
  EXPECT_EQ(tok->encode("abcab", false, false), (std::vector<int32_t>{4, 3}));
  EXPECT_EQ(tok->decode({4, 3, 5}), "abcab");
}

TEST(TokenizerErrors, UnsupportedModel) {
  GgufWriter w;
  w.add_string("tokenizer.ggml.model", "nonsense");
  w.add_strings("tokenizer.ggml.tokens", {"a"});
  expect_error(w, "model", "unsupported tokenizer.ggml.model 'nonsense'");
}

TEST(TokenizerErrors, MissingModelOrTokens) {
  GgufWriter w;
  w.add_string("general.architecture", "llama");
  expect_error(w, "nomodel", "no tokenizer.ggml.model");
  GgufWriter w2;
  w2.add_string("tokenizer.ggml.model", "llama");
  expect_error(w2, "notokens", "tokenizer.ggml.tokens is missing");
}

TEST(TokenizerErrors, UnsupportedPre) {
  GgufWriter v;
  v.add_string("tokenizer.ggml.model", "gpt2");
  v.add_string("tokenizer.ggml.pre", "no-such-pre");
  v.add_strings("tokenizer.ggml.tokens", {"a", "b", "ab"});
  v.add_strings("tokenizer.ggml.merges", {"a b"});
  expect_error(v, "pre", "unsupported tokenizer.ggml.pre 'no-such-pre'");
}

TEST(TokenizerBpe, EverySupportedPreCompilesAndSplits) {
  for (const char* pre : {"default", "gpt-2", "llama3", "llama-bpe", "smollm", "qwen2", "falcon", "starcoder",
                          "dbrx", "deepseek-coder", "command-r", "olmo"}) {
    GgufWriter v;
    v.add_string("tokenizer.ggml.model", "gpt2");
    v.add_string("tokenizer.ggml.pre", pre);
    v.add_strings("tokenizer.ggml.tokens", {"a", "b", "ab", "1", "2", "\xC4\xA0", "\xC4\x8A"});  // Ġ (space), Ċ (\n)
    v.add_strings("tokenizer.ggml.merges", {"a b"});
    std::unique_ptr<Tokenizer> tok;
    ASSERT_NO_THROW(tok = load(v, std::string("pre_") + pre)) << pre;
    const auto ids = tok->encode("ab 12\nab", false, false);
    EXPECT_EQ(tok->decode(ids), "ab 12\nab") << pre;
    EXPECT_EQ(ids.front(), 2) << pre;
  }
}

TEST(TokenizerBpe, LongInputs) {
  const std::string path = shared_path("models/llama.cpp-vocab/ggml-vocab-gpt-2.gguf");
  SKIP_IF_MISSING(path);
  auto f = GgufFile::open(path);
  auto tok = Tokenizer::from_gguf(*f);
  // A long whitespace run exercises the \s+(?!\S) backtracking; a long mixed text the merge loop.
  const std::string spaces = std::string(100000, ' ') + "x";
  EXPECT_EQ(tok->decode(tok->encode(spaces, false, false)), spaces);
  std::string mixed;
  for (int i = 0; i < 2000; ++i) mixed += "Line " + std::to_string(i) + ":\tcaf\xC3\xA9 <|x|> \xE4\xBD\xA0\xE5\xA5\xBD!\n";
  EXPECT_EQ(tok->decode(tok->encode(mixed, false, true)), mixed);
}

TEST(TokenizerErrors, BrokenMerges) {
  GgufWriter v;
  v.add_string("tokenizer.ggml.model", "gpt2");
  v.add_string("tokenizer.ggml.pre", "gpt-2");
  v.add_strings("tokenizer.ggml.tokens", {"a", "b", "ab"});
  v.add_strings("tokenizer.ggml.merges", {"a b", "ab zz"});
  expect_error(v, "merge_missing", "references a token that is not in the vocabulary");
  GgufWriter u;
  u.add_string("tokenizer.ggml.model", "gpt2");
  u.add_strings("tokenizer.ggml.tokens", {"a", "b", "ab"});
  u.add_strings("tokenizer.ggml.merges", {"ab"});
  expect_error(u, "merge_form", "is not of the form 'left right'");
  GgufWriter x;
  x.add_string("tokenizer.ggml.model", "gpt2");
  x.add_strings("tokenizer.ggml.tokens", {"a", "b", "ab"});
  expect_error(x, "no_merges", "without tokenizer.ggml.merges");
}

TEST(TokenizerErrors, CountMismatchAndBadTypes) {
  GgufWriter v;
  v.add_string("tokenizer.ggml.model", "llama");
  v.add_strings("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "a"});
  v.add_f32s("tokenizer.ggml.scores", {0, 0, 0});
  expect_error(v, "scores", "tokenizer.ggml.scores has 3 entries but there are 4 tokens");
  GgufWriter t;
  t.add_string("tokenizer.ggml.model", "llama");
  t.add_strings("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "a"});
  t.add_i32s("tokenizer.ggml.token_type", {2, 3, 3});
  expect_error(t, "types_n", "token_type has 3 entries but there are 4 tokens");
  GgufWriter u;
  u.add_string("tokenizer.ggml.model", "llama");
  u.add_strings("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "a"});
  u.add_i32s("tokenizer.ggml.token_type", {2, 3, 3, 9});
  expect_error(u, "types_bad", "unknown token type 9");
  GgufWriter b;
  b.add_string("tokenizer.ggml.model", "llama");
  b.add_strings("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "a"});
  b.add_u32("tokenizer.ggml.bos_token_id", 17);
  expect_error(b, "bos", "bos_token_id = 17 is outside the vocabulary");
  GgufWriter s;  // wrong value type for the tokens array
  s.add_string("tokenizer.ggml.model", "llama");
  s.add_f32s("tokenizer.ggml.tokens", {1, 2});
  expect_error(s, "tokens_type", "should be a string array");
}

TEST(TokenizerErrors, SpmWithoutByteTokensThrowsOnUnknownBytes) {
  GgufWriter v;
  v.add_string("tokenizer.ggml.model", "llama");
  v.add_strings("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "\xE2\x96\x81" "a", "a"});
  v.add_i32s("tokenizer.ggml.token_type", {1, 3, 3, 1, 1});  // no UNKNOWN-typed token, but unk id defaults to 0
  auto tok = load(v, "spm_nobytes");
  EXPECT_EQ(tok->encode("a", false, false), (std::vector<int32_t>{3}));
  // Neither '▁' (3 bytes) nor 'z' has a token or a byte token: each byte becomes <unk>.
  EXPECT_EQ(tok->encode("z", false, false), (std::vector<int32_t>{0, 0, 0, 0}));
}
