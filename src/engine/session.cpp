#include "engine/session.h"

#include <cstring>

#include "engine/sampler.h"
#include "util/clock.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace spc {

int32_t lookup_guess(const std::vector<int32_t>& seq, int max_len) {
  const int64_t n = (int64_t)seq.size();
  if (n < 2 || max_len < 1) return -1;
  int best_len = 0;
  int32_t best = -1;
  // Candidates end at e < n - 1 with seq[e] == the last token; the match extends backwards.
  for (int64_t e = n - 2; e >= 0 && best_len < max_len; --e) {
    if (seq[e] != seq[n - 1]) continue;
    int len = 1;
    while (len < max_len && e - len >= 0 && seq[e - len] == seq[n - 1 - len]) ++len;
    if (len > best_len) best_len = len, best = seq[e + 1];
  }
  return best;
}

Session::Session(const Model& model, std::unique_ptr<KvPolicy> kv, ThreadPool& pool)
    : model_(model), kv_(std::move(kv)), pool_(pool) {
  logits_.assign((size_t)model.config().n_vocab, 0.0f);
}

void Session::prefill(const std::vector<int32_t>& tokens, std::vector<float>* all_logits,
                      const Model::Progress& progress) {
  const double t0 = now_ms();
  model_.prefill(tokens.data(), (int64_t)tokens.size(), *kv_, pool_, scratch_, logits_.data(), all_logits, progress);
  timings_.prefill_ms += now_ms() - t0;
  timings_.prefill_tokens += (int64_t)tokens.size();
  spec_next_ = spec_prev_ = -1;
  seq_.insert(seq_.end(), tokens.begin(), tokens.end());
}

void Session::prefill_from(const Session& other, int64_t n_prefix) {
  SPC_CHECK(kv_->n_cached() == 0, "prefill_from needs an empty cache");
  const KvGeometry& g = other.kv().geometry();
  const int64_t n_other = other.kv().n_cached();
  const int64_t n = n_prefix < 0 ? n_other : n_prefix;
  SPC_CHECK(n <= n_other, "prefill_from: %lld positions asked, the other session holds %lld", (long long)n,
            (long long)n_other);
  SPC_CHECK(n <= kv_->geometry().n_ctx, "prefill_from: %lld positions do not fit the context of %lld", (long long)n,
            (long long)kv_->geometry().n_ctx);
  SPC_ASSERT((int64_t)other.seq_.size() >= n);
  std::vector<float> k((size_t)n * g.n_head_kv * g.head_dim), v(k.size());
  for (int il = 0; il < g.n_layer; ++il) {
    other.kv().export_layer(il, n, k.data(), v.data());
    if (n > 0) kv_->store_prefill(il, 0, n, k.data(), v.data());
  }
  // Logits after the last position are known only when all of it is taken over.
  if (n == n_other) logits_ = other.logits_;
  else std::fill(logits_.begin(), logits_.end(), 0.0f);
  spec_next_ = spec_prev_ = -1;
  seq_.assign(other.seq_.begin(), other.seq_.begin() + n);
}

void Session::decode(int32_t token) {
  const int n_vocab = model_.config().n_vocab;
  const double t0 = now_ms();
  seq_.push_back(token);
  if (!kv_->wants_speculative_row()) {
    model_.decode(&token, 1, 1, *kv_, pool_, scratch_, logits_.data());
  } else {
    if (spec_next_ < 0) {
      // Pre-decoding: one row that selects its own top-k from the low-bit copy layer by layer
      // (n_keep = 0 tells the policy), keeps no K/V, and its logits give the first guess.
      step_logits_.resize((size_t)n_vocab);
      model_.decode(&token, 1, 0, *kv_, pool_, scratch_, step_logits_.data());
      spec_next_ = argmax(step_logits_.data(), n_vocab);
    }
    if (spec_prev_ >= 0) guesses_.checked += 1, guesses_.hits += token == spec_prev_;
    if (spec_prev_ >= 0 && token != spec_prev_) kv_->note_guess_miss();
    if (kv_->guess_by_lookup()) {
      // A miss: row 1 ran on the wrong token, so the guess it made for the position after this
      // token was conditioned on it; the sequence itself gives a better one where it repeats.
      if (spec_prev_ >= 0 && token != spec_prev_)
        if (const int32_t g = lookup_guess(seq_); g >= 0) spec_next_ = g;
    }
    const int32_t rows[2] = {token, spec_next_};
    const int n_rows = kv_->n_cached() + 2 <= kv_->geometry().n_ctx + 1 ? 2 : 1;
    step_logits_.resize((size_t)n_rows * n_vocab);
    model_.decode(rows, n_rows, 1, *kv_, pool_, scratch_, step_logits_.data());
    std::memcpy(logits_.data(), step_logits_.data(), sizeof(float) * n_vocab);
    spec_prev_ = n_rows == 2 ? spec_next_ : -1;
    spec_next_ = n_rows == 2 ? argmax(step_logits_.data() + n_vocab, n_vocab) : argmax(logits_.data(), n_vocab);
  }
  timings_.decode_ms += now_ms() - t0;
  timings_.decode_tokens += 1;
}

}  // namespace spc
