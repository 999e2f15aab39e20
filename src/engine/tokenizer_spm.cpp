// SentencePiece-BPE encoding (tokenizer.ggml.model = "llama").
//
// The input (spaces already replaced by '▁') starts as one symbol per UTF-8 character. Adjacent pairs
// whose concatenation is a vocabulary token are candidates; the candidate with the highest token score
// (ties: leftmost) is merged, repeatedly. Each final symbol is emitted as its token if it has one, else
// falls back to <0xXX> byte tokens. (Every merge produces a vocabulary token, so only unmerged single
// characters can lack a token; llama.cpp's re-split along recorded merges never applies and is omitted.)
#include <queue>

#include "engine/tokenizer.h"
#include "engine/tokenizer_unicode.h"
#include "util/error.h"

namespace spc {

namespace {

struct Sym {
  int prev, next;
  size_t off, n;  // bytes of the input
};

struct Cand {
  int left, right;
  float score;
  size_t size;
};

struct CandLess {
  bool operator()(const Cand& a, const Cand& b) const {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  }
};

}  // namespace

void Tokenizer::encode_spm(std::string_view text, std::vector<int32_t>& out) const {
  std::vector<Sym> syms;
  for (size_t off = 0; off < text.size();) {
    const size_t len = std::min(tok::utf8_len(text[off]), text.size() - off);
    const int idx = (int)syms.size();
    syms.push_back({idx - 1, off + len == text.size() ? -1 : idx + 1, off, len});
    off += len;
  }
  if (syms.empty()) return;

  std::priority_queue<Cand, std::vector<Cand>, CandLess> queue;

  auto try_pair = [&](int l, int r) {
    if (l < 0 || r < 0) return;
    const std::string_view s = text.substr(syms[l].off, syms[l].n + syms[r].n);
    const int32_t id = id_of(s);
    if (id < 0) return;
    queue.push({l, r, scores_[id], s.size()});
  };
  for (int i = 1; i < (int)syms.size(); ++i) try_pair(i - 1, i);

  while (!queue.empty()) {
    const Cand c = queue.top();
    queue.pop();
    Sym& l = syms[c.left];
    Sym& r = syms[c.right];
    if (l.n == 0 || r.n == 0 || l.n + r.n != c.size) continue;  // stale
    l.n += r.n;
    r.n = 0;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = c.left;
    try_pair(l.prev, c.left);
    try_pair(c.left, l.next);
  }

  for (int i = 0; i != -1; i = syms[i].next) {
    const std::string_view piece = text.substr(syms[i].off, syms[i].n);
    if (const int32_t id = id_of(piece); id >= 0) {
      out.push_back(id);
      continue;
    }
    for (char ch : piece) {
      int32_t id = byte_tokens_[(uint8_t)ch];
      if (id < 0) id = unk_;
      SPC_CHECK(id >= 0, "cannot encode byte 0x%02X: the vocabulary has no <0x%02X> byte token and no unknown token",
                (unsigned)(uint8_t)ch, (unsigned)(uint8_t)ch);
      out.push_back(id);
    }
  }
}

}  // namespace spc
