// Tokenizer: metadata loading and validation, special-token partitioning, pieces and decoding.
// The SPM and BPE merge loops live in tokenizer_spm.cpp / tokenizer_bpe.cpp.
#include "engine/tokenizer.h"

#include <algorithm>
#include <cstring>

#include "engine/tokenizer_unicode.h"
#include "gguf/gguf.h"
#include "util/error.h"

namespace spc {

namespace tok {

size_t utf8_decode(std::string_view s, size_t i, uint32_t* cp) {
  const size_t n = s.size() - i;
  const uint8_t b0 = (uint8_t)s[i];
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  }
  size_t len;
  uint32_t c, min;
  if ((b0 & 0xE0) == 0xC0) { len = 2; c = b0 & 0x1F; min = 0x80; }
  else if ((b0 & 0xF0) == 0xE0) { len = 3; c = b0 & 0x0F; min = 0x800; }
  else if ((b0 & 0xF8) == 0xF0) { len = 4; c = b0 & 0x07; min = 0x10000; }
  else return 0;
  if (n < len) return 0;
  for (size_t k = 1; k < len; ++k) {
    const uint8_t b = (uint8_t)s[i + k];
    if ((b & 0xC0) != 0x80) return 0;
    c = (c << 6) | (b & 0x3F);
  }
  if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return 0;
  *cp = c;
  return len;
}

std::string utf8_sanitize(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    uint32_t cp;
    const size_t len = utf8_decode(s, i, &cp);
    if (len == 0) {
      out += "\xEF\xBF\xBD";
      ++i;
    } else {
      out.append(s.data() + i, len);
      i += len;
    }
  }
  return out;
}

namespace {
struct ByteMap {
  uint32_t to_cp[256];
  int16_t from_cp[512];
  ByteMap() {
    std::fill(std::begin(from_cp), std::end(from_cp), (int16_t)-1);
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_cp[b] = printable ? (uint32_t)b : next++;
      from_cp[to_cp[b]] = (int16_t)b;
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}
}  // namespace

uint32_t byte_to_cp(uint8_t b) { return byte_map().to_cp[b]; }
int cp_to_byte(uint32_t cp) { return cp < 512 ? byte_map().from_cp[cp] : -1; }

}  // namespace tok

namespace {

const char* kSpmSpace = "\xE2\x96\x81";  // U+2581 '▁'

std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  for (size_t m; (m = s.find(from, pos)) != std::string_view::npos; pos = m + from.size()) {
    out.append(s.substr(pos, m - pos));
    out.append(to);
  }
  out.append(s.substr(pos));
  return out;
}

// Parses "<0xXX>"; -1 if the text has another form.
int parse_byte_token(const std::string& t) {
  if (t.size() != 6 || t[0] != '<' || t[1] != '0' || t[2] != 'x' || t[5] != '>') return -1;
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  const int h = hex(t[3]), l = hex(t[4]);
  return (h < 0 || l < 0) ? -1 : h * 16 + l;
}

// Token texts that end a turn in common chat formats (llama.cpp's list of end-of-generation names).
const char* const kEogNames[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>",
    "<|end_of_text|>", "<\xEF\xBD\x9C" "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>", "<|return|>", "<|call|>",
};

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::from_gguf(const GgufFile& f) {
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  const std::string& path = f.path();
  const auto model = f.get_string("tokenizer.ggml.model");
  SPC_CHECK(model.has_value(), "%s: no tokenizer.ggml.model in the metadata (not a model with a vocabulary?)",
            path.c_str());
  if (*model == "llama") t->kind_ = Kind::SPM;
  else if (*model == "gpt2") t->kind_ = Kind::BPE;
  else
    throw Error(strfmt("%s: unsupported tokenizer.ggml.model '%s' (supported: 'llama' SentencePiece, 'gpt2' byte-level BPE)",
                       path.c_str(), model->c_str()));

  const auto tokens = f.get_string_array("tokenizer.ggml.tokens");
  SPC_CHECK(!tokens.empty(), "%s: tokenizer.ggml.tokens is missing or empty", path.c_str());
  SPC_CHECK(tokens.size() < (size_t)INT32_MAX, "%s: too many tokens (%zu)", path.c_str(), tokens.size());
  const size_t n = tokens.size();

  t->scores_ = f.get_f32_array("tokenizer.ggml.scores");
  if (t->scores_.empty()) t->scores_.assign(n, 0.0f);
  SPC_CHECK(t->scores_.size() == n, "%s: tokenizer.ggml.scores has %zu entries but there are %zu tokens",
            path.c_str(), t->scores_.size(), n);

  const auto types = f.get_i32_array("tokenizer.ggml.token_type");
  SPC_CHECK(types.empty() || types.size() == n, "%s: tokenizer.ggml.token_type has %zu entries but there are %zu tokens",
            path.c_str(), types.size(), n);
  t->types_.assign(n, TokenType::NORMAL);
  for (size_t i = 0; i < types.size(); ++i) {
    SPC_CHECK(types[i] >= 0 && types[i] <= 6, "%s: token %zu has unknown token type %d (expected 0..6)", path.c_str(), i,
              types[i]);
    t->types_[i] = (TokenType)types[i];
  }

  t->texts_.reserve(n);
  t->text_to_id_.reserve(n * 2);
  for (size_t i = 0; i < n; ++i) {
    t->texts_.emplace_back(tokens[i]);
    t->text_to_id_[t->texts_.back()] = (int32_t)i;  // a later duplicate wins, as in llama.cpp
  }

  auto opt_id = [&](const char* key, int32_t dflt) -> int32_t {
    const auto v = f.get_int(key);
    if (!v) return dflt;
    SPC_CHECK(*v >= -1 && *v < (int64_t)n, "%s: %s = %lld is outside the vocabulary (%zu tokens)", path.c_str(), key,
              (long long)*v, n);
    return (int32_t)*v;
  };
  const bool spm = t->kind_ == Kind::SPM;
  auto dflt = [&](int32_t id) { return spm && id < (int32_t)n ? id : -1; };
  t->bos_ = opt_id("tokenizer.ggml.bos_token_id", dflt(1));
  t->eos_ = opt_id("tokenizer.ggml.eos_token_id", dflt(2));
  t->unk_ = opt_id("tokenizer.ggml.unknown_token_id", dflt(0));
  const int32_t eot = opt_id("tokenizer.ggml.eot_token_id", -1);
  const int32_t eom = opt_id("tokenizer.ggml.eom_token_id", -1);

  t->pre_ = f.get_string("tokenizer.ggml.pre").value_or("default");
  t->add_bos_ = spm;
  t->add_space_prefix_ = spm;
  if (spm) t->load_spm();
  else t->load_bpe(f);
  if (auto v = f.get_bool("tokenizer.ggml.add_bos_token")) t->add_bos_ = *v;
  if (auto v = f.get_bool("tokenizer.ggml.add_space_prefix")) t->add_space_prefix_ = *v;

  // Special tokens, longest text first (stable: equal lengths keep id order).
  for (size_t i = 0; i < n; ++i) {
    const TokenType ty = t->types_[i];
    if (ty == TokenType::CONTROL || ty == TokenType::USER_DEFINED || ty == TokenType::UNKNOWN)
      t->special_ids_.push_back((int32_t)i);
  }
  std::stable_sort(t->special_ids_.begin(), t->special_ids_.end(),
                   [&](int32_t a, int32_t b) { return t->texts_[a].size() > t->texts_[b].size(); });

  // End of generation.
  for (int32_t id : {t->eos_, eot, eom})
    if (id >= 0) t->eog_.insert(id);
  for (const char* name : kEogNames)
    if (int32_t id = t->id_of(name); id >= 0) t->eog_.insert(id);

  // Pieces.
  t->pieces_.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string& text = t->texts_[i];
    std::string& piece = t->pieces_[i];
    switch (t->types_[i]) {
      case TokenType::CONTROL:
      case TokenType::UNUSED:
        break;
      case TokenType::UNKNOWN:
        if (spm) piece = "\xE2\x96\x85";  // '▅', what llama.cpp prints for <unk>
        break;
      case TokenType::BYTE: {
        const int b = parse_byte_token(text);
        piece = b >= 0 ? std::string(1, (char)b) : text;
        break;
      }
      case TokenType::USER_DEFINED:
        piece = spm ? replace_all(text, kSpmSpace, " ") : text;
        break;
      case TokenType::NORMAL:
      case TokenType::UNDEFINED:
        if (spm) {
          piece = replace_all(text, kSpmSpace, " ");
        } else {
          // Byte-level: every code point stands for one byte; keep code points outside the map as they are.
          for (size_t k = 0; k < text.size();) {
            uint32_t cp;
            size_t len = tok::utf8_decode(text, k, &cp);
            if (len == 0) {
              piece += text[k];
              ++k;
              continue;
            }
            const int b = tok::cp_to_byte(cp);
            if (b >= 0) piece += (char)b;
            else piece.append(text, k, len);
            k += len;
          }
        }
        break;
    }
  }
  return t;
}

void Tokenizer::load_spm() {
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    int32_t id = id_of(name);
    if (id < 0) id = id_of(std::string(1, (char)b));
    byte_tokens_[b] = id;
  }
}

int32_t Tokenizer::id_of(std::string_view text) const {
  auto it = text_to_id_.find(std::string(text));
  return it == text_to_id_.end() ? -1 : it->second;
}

std::optional<int32_t> Tokenizer::find_token(std::string_view text) const {
  const int32_t id = id_of(text);
  if (id < 0) return std::nullopt;
  return id;
}

void Tokenizer::check_id(int32_t id) const {
  SPC_CHECK(id >= 0 && id < n_vocab(), "token id %d is outside the vocabulary (%d tokens)", id, n_vocab());
}

const std::string& Tokenizer::token_text(int32_t id) const {
  check_id(id);
  return texts_[id];
}

TokenType Tokenizer::token_type(int32_t id) const {
  check_id(id);
  return types_[id];
}

std::string Tokenizer::token_to_piece(int32_t id) const {
  check_id(id);
  return pieces_[id];
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  bool strip = kind_ == Kind::SPM && add_space_prefix_;
  for (int32_t id : ids) {
    check_id(id);
    const std::string& p = pieces_[id];
    if (p.empty()) continue;
    if (strip && p[0] == ' ') out.append(p, 1, std::string::npos);
    else out += p;
    strip = false;
  }
  return out;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos, bool parse_special) const {
  std::vector<int32_t> out;
  if (add_bos && bos_ >= 0) out.push_back(bos_);
  if (text.empty()) return out;

  // Partition into raw-text fragments and special tokens: each special token (longest first) splits every
  // raw fragment at all its occurrences, left to right.
  struct Frag {
    int32_t id;  // >= 0: a special token; -1: raw text [off, off + len)
    size_t off, len;
  };
  std::vector<Frag> frags{{-1, 0, text.size()}}, next;
  for (int32_t sid : special_ids_) {
    const TokenType ty = types_[sid];
    if (!parse_special && ty != TokenType::USER_DEFINED) continue;
    const std::string& st = texts_[sid];
    if (st.empty() || text.find(st) == std::string_view::npos) continue;
    next.clear();
    for (const Frag& fr : frags) {
      if (fr.id >= 0 || fr.len < st.size()) {
        next.push_back(fr);
        continue;
      }
      const std::string_view sub = text.substr(fr.off, fr.len);
      size_t pos = 0;
      for (size_t m; (m = sub.find(st, pos)) != std::string_view::npos; pos = m + st.size()) {
        if (m > pos) next.push_back({-1, fr.off + pos, m - pos});
        next.push_back({sid, fr.off + m, st.size()});
      }
      if (pos < sub.size()) next.push_back({-1, fr.off + pos, sub.size() - pos});
    }
    frags.swap(next);
  }

  bool prev_special = true;  // SPM: a raw fragment at the start or after a special token gets the space prefix
  for (const Frag& fr : frags) {
    if (fr.id >= 0) {
      out.push_back(fr.id);
      prev_special = true;
      continue;
    }
    const std::string_view raw = text.substr(fr.off, fr.len);
    if (kind_ == Kind::SPM) {
      std::string s;
      if (add_space_prefix_ && prev_special) s = kSpmSpace;
      s += replace_all(raw, " ", kSpmSpace);
      encode_spm(s, out);
    } else {
      encode_bpe(raw, out);
    }
    prev_special = false;
  }
  return out;
}

}  // namespace spc
