// GPT-2 byte-level BPE (tokenizer.ggml.model = "gpt2").
//
// 1. Pre-tokenization: the text (invalid UTF-8 replaced by U+FFFD) is split by a sequence of regexes chosen by
//    tokenizer.ggml.pre. Each regex is applied separately inside every piece produced by the previous one, and
//    both its matches and the unmatched text between them become pieces.
// 2. Each piece is byte-level encoded (every byte -> one code point of GPT-2's bytes_to_unicode) and split into
//    characters; the adjacent pair with the lowest merge rank (ties: leftmost) is merged, repeatedly.
// 3. Final symbols map to tokens (a symbol without a token falls back to its single-byte tokens).
#include <queue>

#include "engine/tokenizer.h"
#include "engine/tokenizer_unicode.h"
#include "gguf/gguf.h"
#include "util/error.h"

#include <pcre2.h>

namespace spc {

struct Tokenizer::Regex {
  pcre2_code* code = nullptr;
  std::string pattern;
  ~Regex() {
    if (code) pcre2_code_free(code);
  }
};

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;

namespace {

// The regexes are llama.cpp's per-pre-tokenizer lists (themselves adapted from each model's tokenizer.json).
const char* const kGpt2 =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)";
const char* const kLlama3 =
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const char* const kQwen2 =
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

struct PreSpec {
  std::vector<const char*> regexes;
  bool ignore_merges = false;  // a pre-token that is itself a vocabulary token is emitted whole
  bool add_bos = false;        // default for tokenizer.ggml.add_bos_token
};

bool one_of(const std::string& s, std::initializer_list<const char*> names) {
  for (const char* n : names)
    if (s == n) return true;
  return false;
}

PreSpec pre_spec(const std::string& pre, const std::string& path) {
  if (pre == "default")
    return {{"[\\p{P}\\$\\+<=>\\^~\\|]+", kGpt2, "\\p{N}+", "[0-9][0-9][0-9]"}};
  if (one_of(pre, {"gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de", "gigachat", "jina-v1-en",
                   "jina-v2-es", "jina-v2-de", "roberta-bpe", "trillion"}))
    return {{kGpt2}};
  if (one_of(pre, {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"})) return {{kLlama3}, true, true};
  if (one_of(pre, {"dbrx", "smaug-bpe", "chatglm-bpe"})) return {{kLlama3}};
  if (one_of(pre, {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}))
    return {{"\\p{N}", kGpt2}};
  if (one_of(pre, {"qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"})) return {{kQwen2}};
  if (pre == "falcon") return {{"[\\p{P}\\$\\+<=>\\^~\\|`]+", kGpt2, "[0-9][0-9][0-9]"}};
  if (one_of(pre, {"deepseek-coder"}))
    return {{"[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[\xE4\xB8\x80-\xE9\xBE\xA5\xE0\xA0\x80-\xE4\xB8\x80\xEA\xB0\x80-\xED\x9F\xBF]+",
             "\\p{N}"}};
  throw Error(strfmt("%s: unsupported tokenizer.ggml.pre '%s' for a gpt2 (byte-level BPE) vocabulary", path.c_str(),
                     pre.c_str()));
}

// Splits every [off, off+len) piece of `text` by `re`: matches and the gaps between them become the new pieces.
void regex_split(const Tokenizer::Regex& re, const std::string& text, std::vector<std::pair<size_t, size_t>>& pieces) {
  std::vector<std::pair<size_t, size_t>> out;
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(re.code, nullptr);
  SPC_CHECK(md != nullptr, "out of memory creating PCRE2 match data");
  for (const auto& [off, len] : pieces) {
    const auto* subject = (PCRE2_SPTR)(text.data() + off);
    size_t pos = 0, last = 0;
    while (pos < len) {
      const int rc = pcre2_match(re.code, subject, len, pos, PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        pcre2_match_data_free(md);
        throw Error(strfmt("pre-tokenizer regex failed on a %zu-byte piece: %s", len, (const char*)msg));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      const size_t s = ov[0], e = ov[1];
      if (e == s) {  // empty match: step one character (none of our patterns match empty, but be safe)
        pos = s + std::min(tok::utf8_len(text[off + s]), len - s);
        continue;
      }
      if (s > last) out.emplace_back(off + last, s - last);
      out.emplace_back(off + s, e - s);
      last = pos = e;
    }
    if (last < len) out.emplace_back(off + last, len - last);
  }
  pcre2_match_data_free(md);
  pieces.swap(out);
}

struct Sym {
  int prev, next;
  size_t off, n;  // bytes of the byte-level encoded word
};

struct Cand {
  int left, right;
  int32_t rank;
  size_t size;
};

struct CandGreater {
  bool operator()(const Cand& a, const Cand& b) const {
    return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
  }
};

std::string merge_key(std::string_view a, std::string_view b) {
  std::string k;
  k.reserve(a.size() + b.size() + 1);
  k.append(a);
  k += '\0';  // cannot occur in byte-level text (byte 0 is U+0100)
  k.append(b);
  return k;
}

}  // namespace

void Tokenizer::load_bpe(const GgufFile& f) {
  const std::string& path = f.path();
  const PreSpec spec = pre_spec(pre_, path);
  ignore_merges_ = spec.ignore_merges;
  add_bos_ = spec.add_bos;
  for (const char* pat : spec.regexes) {
    auto re = std::make_unique<Regex>();
    re->pattern = pat;
    int err = 0;
    PCRE2_SIZE erroff = 0;
    re->code = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err, &erroff, nullptr);
    if (!re->code) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      throw Error(strfmt("pre-tokenizer regex '%s' does not compile at offset %zu: %s", pat, (size_t)erroff,
                         (const char*)msg));
    }
    pcre2_jit_compile(re->code, PCRE2_JIT_COMPLETE);  // optional: falls back to the interpreter
    regexes_.push_back(std::move(re));
  }

  const auto merges = f.get_string_array("tokenizer.ggml.merges");
  SPC_CHECK(!merges.empty(), "%s: gpt2 vocabulary without tokenizer.ggml.merges", path.c_str());
  merge_rank_.reserve(merges.size() * 2);
  for (size_t i = 0; i < merges.size(); ++i) {
    const std::string_view m = merges[i];
    const size_t sp = m.size() > 1 ? m.find(' ', 1) : std::string_view::npos;
    SPC_CHECK(sp != std::string_view::npos, "%s: merge %zu '%.*s' is not of the form 'left right'", path.c_str(), i,
              (int)m.size(), m.data());
    const std::string_view a = m.substr(0, sp), b = m.substr(sp + 1);
    SPC_CHECK(id_of(a) >= 0 && id_of(b) >= 0, "%s: merge %zu '%.*s' references a token that is not in the vocabulary",
              path.c_str(), i, (int)m.size(), m.data());
    merge_rank_.emplace(merge_key(a, b), (int32_t)i);  // first occurrence wins
  }
}

void Tokenizer::encode_bpe(std::string_view raw, std::vector<int32_t>& out) const {
  const std::string text = tok::utf8_sanitize(raw);
  std::vector<std::pair<size_t, size_t>> pieces{{0, text.size()}};
  for (const auto& re : regexes_) regex_split(*re, text, pieces);

  std::string word;
  std::vector<Sym> syms;
  std::priority_queue<Cand, std::vector<Cand>, CandGreater> queue;
  for (const auto& [off, len] : pieces) {
    word.clear();
    for (size_t k = 0; k < len; ++k) tok::append_utf8(word, tok::byte_to_cp((uint8_t)text[off + k]));

    if (ignore_merges_) {
      if (const int32_t id = id_of(word); id >= 0) {
        out.push_back(id);
        continue;
      }
    }

    syms.clear();
    for (size_t o = 0; o < word.size();) {
      const size_t n = std::min(tok::utf8_len(word[o]), word.size() - o);
      const int idx = (int)syms.size();
      syms.push_back({idx - 1, o + n == word.size() ? -1 : idx + 1, o, n});
      o += n;
    }
    const std::string_view w = word;
    auto try_pair = [&](int l, int r) {
      if (l < 0 || r < 0) return;
      auto it = merge_rank_.find(merge_key(w.substr(syms[l].off, syms[l].n), w.substr(syms[r].off, syms[r].n)));
      if (it == merge_rank_.end()) return;
      queue.push({l, r, it->second, syms[l].n + syms[r].n});
    };
    for (int i = 1; i < (int)syms.size(); ++i) try_pair(i - 1, i);

    while (!queue.empty()) {
      const Cand c = queue.top();
      queue.pop();
      Sym& l = syms[c.left];
      Sym& r = syms[c.right];
      // Stale when either side changed since the candidate was made. Symbols only grow to the right
      // and a symbol's start never moves, so equal total size means both sides are unchanged.
      if (l.n == 0 || r.n == 0 || l.next != c.right || l.n + r.n != c.size) continue;
      l.n += r.n;
      r.n = 0;
      l.next = r.next;
      if (r.next >= 0) syms[r.next].prev = c.left;
      try_pair(l.prev, c.left);
      try_pair(c.left, l.next);
    }

    for (int i = 0; i != -1 && !syms.empty(); i = syms[i].next) {
      const std::string_view s = w.substr(syms[i].off, syms[i].n);
      if (const int32_t id = id_of(s); id >= 0) {
        out.push_back(id);
        continue;
      }
      for (size_t k = 0; k < s.size(); ++k)  // llama.cpp: single-byte tokens of the symbol, where they exist
        if (const int32_t id = id_of(s.substr(k, 1)); id >= 0) out.push_back(id);
    }
  }
}

}  // namespace spc
