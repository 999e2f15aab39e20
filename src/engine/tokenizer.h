// Tokenizer built from a GGUF's tokenizer.ggml.* metadata.
//
// Two vocabulary types:
//  - tokenizer.ggml.model = "llama": SentencePiece BPE (merge by token score), '▁' for spaces,
//    optional space prefix, byte fallback through <0xXX> tokens.
//  - tokenizer.ggml.model = "gpt2": GPT-2 byte-level BPE (merge by rank in tokenizer.ggml.merges),
//    pre-tokenized with the regex sequence that tokenizer.ggml.pre selects.
// Behaviour follows llama.cpp's llama-vocab (which the test vectors come from); see tokenizer.cpp.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace spc {

class GgufFile;

// tokenizer.ggml.token_type values.
enum class TokenType : int32_t {
  UNDEFINED = 0, NORMAL = 1, UNKNOWN = 2, CONTROL = 3, USER_DEFINED = 4, UNUSED = 5, BYTE = 6,
};

class Tokenizer {
 public:
  enum class Kind { SPM, BPE };

  // Throws spc::Error for a missing/unsupported tokenizer.ggml.model or .pre and for inconsistent metadata.
  static std::unique_ptr<Tokenizer> from_gguf(const GgufFile& f);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // add_bos: prepend BOS (if the vocabulary has one); pass add_bos_default() for the model's convention.
  // parse_special: text equal to a CONTROL / USER_DEFINED / UNKNOWN token's text becomes that token (longest
  // token first). As in llama.cpp (and HF tokenizers), USER_DEFINED tokens are split out even when
  // parse_special is false.
  std::vector<int32_t> encode(std::string_view text, bool add_bos, bool parse_special) const;

  // Bytes the token contributes to the output text; "" for CONTROL tokens. Throws for an out-of-range id.
  std::string token_to_piece(int32_t id) const;
  // Concatenation of the pieces. SPM with add_space_prefix: the first non-empty piece loses one leading space.
  std::string decode(const std::vector<int32_t>& ids) const;

  int32_t n_vocab() const { return (int32_t)texts_.size(); }
  int32_t bos_id() const { return bos_; }
  int32_t eos_id() const { return eos_; }
  bool add_bos_default() const { return add_bos_; }
  bool add_space_prefix() const { return add_space_prefix_; }
  Kind kind() const { return kind_; }
  const std::string& pre() const { return pre_; }
  bool is_end_of_generation(int32_t id) const { return eog_.count(id) != 0; }
  std::optional<int32_t> find_token(std::string_view text) const;
  const std::string& token_text(int32_t id) const;
  TokenType token_type(int32_t id) const;

  struct Regex;  // compiled PCRE2 pattern (tokenizer_bpe.cpp)

 private:
  Tokenizer();  // defined where Regex is complete (tokenizer_bpe.cpp)
  void load_bpe(const GgufFile& f);
  void load_spm();
  void encode_spm(std::string_view text, std::vector<int32_t>& out) const;
  void encode_bpe(std::string_view text, std::vector<int32_t>& out) const;
  int32_t id_of(std::string_view text) const;  // -1 if absent
  void check_id(int32_t id) const;

  Kind kind_ = Kind::SPM;
  std::string pre_;
  std::vector<std::string> texts_;
  std::vector<float> scores_;
  std::vector<TokenType> types_;
  std::vector<std::string> pieces_;
  std::unordered_map<std::string, int32_t> text_to_id_;
  std::vector<int32_t> special_ids_;  // CONTROL / USER_DEFINED / UNKNOWN, longest text first
  std::unordered_set<int32_t> eog_;
  int32_t bos_ = -1, eos_ = -1, unk_ = -1;
  bool add_bos_ = false;
  bool add_space_prefix_ = false;

  // SPM
  int32_t byte_tokens_[256] = {};  // -1 where the vocabulary has no token for the byte

  // BPE
  std::unordered_map<std::string, int32_t> merge_rank_;  // "left right" -> rank
  std::vector<std::unique_ptr<Regex>> regexes_;
  bool ignore_merges_ = false;
};

}  // namespace spc
