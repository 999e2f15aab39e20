#include "engine/session.h"

#include <array>
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

void Session::prefill_from(const Session& other, int64_t n_prefix, bool share) {
  SPC_CHECK(kv_->n_cached() == 0, "prefill_from needs an empty cache");
  const KvGeometry& g = other.kv().geometry();
  const int64_t n_other = other.kv().n_cached();
  const int64_t n = n_prefix < 0 ? n_other : n_prefix;
  SPC_CHECK(n <= n_other, "prefill_from: %lld positions asked, the other session holds %lld", (long long)n,
            (long long)n_other);
  SPC_CHECK(n <= kv_->geometry().n_ctx, "prefill_from: %lld positions do not fit the context of %lld", (long long)n,
            (long long)kv_->geometry().n_ctx);
  SPC_ASSERT((int64_t)other.seq_.size() >= n);
  const int64_t s = share ? kv_->share_prefix(other.kv(), n) : 0;
  SPC_ASSERT(s >= 0 && s <= n && kv_->n_cached() == s);
  std::vector<float> k((size_t)(n - s) * g.n_head_kv * g.head_dim), v(k.size());
  for (int il = 0; il < g.n_layer && n > s; ++il) {
    other.kv().export_layer(il, s, n - s, k.data(), v.data());
    kv_->store_prefill(il, s, n - s, k.data(), v.data());
  }
  // Logits after the last position are known only when all of it is taken over.
  if (n == n_other) logits_ = other.logits_;
  else std::fill(logits_.begin(), logits_.end(), 0.0f);
  spec_next_ = spec_prev_ = -1;
  seq_.assign(other.seq_.begin(), other.seq_.begin() + n);
}

void Session::decode(int32_t token) {
  Session* self = this;
  decode_together(&self, &token, 1, scratch_, step_logits_);
}

void Session::decode_together(Session* const* ss, const int32_t* tokens, int n, ForwardScratch& scratch,
                              std::vector<float>& step_logits) {
  SPC_CHECK(n >= 1, "decode step without sessions");
  const Model& model = ss[0]->model_;
  ThreadPool& pool = ss[0]->pool_;
  for (int i = 0; i < n; ++i) {
    SPC_CHECK(&ss[i]->model_ == &model && &ss[i]->pool_ == &pool,
              "batched decode: session %d has another model or thread pool than session 0", i);
    for (int j = 0; j < i; ++j) SPC_CHECK(ss[j] != ss[i], "batched decode: session %d appears twice", i);
    const KvPolicy& kv = *ss[i]->kv_;
    SPC_CHECK(kv.n_cached() < kv.geometry().n_ctx, "context full: %lld positions cached, context size %lld%s",
              (long long)kv.n_cached(), (long long)kv.geometry().n_ctx,
              n > 1 ? strfmt(" (session %d of the batch)", i).c_str() : "");
  }
  const size_t n_vocab = (size_t)model.config().n_vocab;
  const double t0 = now_ms();
  std::vector<DecodeSeq> seqs;
  seqs.reserve((size_t)n);
  for (int i = 0; i < n; ++i) ss[i]->seq_.push_back(tokens[i]);

  // Pre-decoding (speculative policies, first step after a prefill): one row that selects its own
  // top-k from the low-bit copy layer by layer (n_keep = 0 tells the policy), keeps no K/V, and
  // whose logits give the first guess.
  std::vector<int> pre;
  for (int i = 0; i < n; ++i)
    if (ss[i]->kv_->wants_speculative_row() && ss[i]->spec_next_ < 0) {
      pre.push_back(i);
      seqs.push_back(DecodeSeq{&tokens[i], 1, 0, ss[i]->kv_.get()});
    }
  if (!pre.empty()) {
    step_logits.resize(seqs.size() * n_vocab);
    model.decode_batch(seqs.data(), (int)seqs.size(), pool, scratch, step_logits.data());
    for (size_t p = 0; p < pre.size(); ++p)
      ss[pre[p]]->spec_next_ = argmax(step_logits.data() + p * n_vocab, (int)n_vocab);
  }

  // The step itself: [real] rows, or [real, guess] for speculative policies.
  std::vector<std::array<int32_t, 2>> rows((size_t)n);
  seqs.clear();
  for (int i = 0; i < n; ++i) {
    Session& s = *ss[i];
    const int32_t token = tokens[i];
    if (!s.kv_->wants_speculative_row()) {
      rows[(size_t)i] = {token, -1};
      seqs.push_back(DecodeSeq{rows[(size_t)i].data(), 1, 1, s.kv_.get()});
      continue;
    }
    if (s.spec_prev_ >= 0) s.guesses_.checked += 1, s.guesses_.hits += token == s.spec_prev_;
    if (s.spec_prev_ >= 0 && token != s.spec_prev_) s.kv_->note_guess_miss();
    if (s.kv_->guess_by_lookup()) {
      // A miss: row 1 ran on the wrong token, so the guess it made for the position after this
      // token was conditioned on it; the sequence itself gives a better one where it repeats.
      if (s.spec_prev_ >= 0 && token != s.spec_prev_)
        if (const int32_t g = lookup_guess(s.seq_); g >= 0) s.spec_next_ = g;
    }
    rows[(size_t)i] = {token, s.spec_next_};
    const int n_rows = s.kv_->n_cached() + 2 <= s.kv_->geometry().n_ctx + 1 ? 2 : 1;
    seqs.push_back(DecodeSeq{rows[(size_t)i].data(), n_rows, 1, s.kv_.get()});
  }
  size_t total_rows = 0;
  for (const DecodeSeq& q : seqs) total_rows += (size_t)q.n_rows;
  step_logits.resize(total_rows * n_vocab);
  model.decode_batch(seqs.data(), n, pool, scratch, step_logits.data());

  const double dt = now_ms() - t0;
  size_t row = 0;
  for (int i = 0; i < n; ++i) {
    Session& s = *ss[i];
    const int n_rows = seqs[(size_t)i].n_rows;
    const float* l0 = step_logits.data() + row * n_vocab;
    std::memcpy(s.logits_.data(), l0, sizeof(float) * n_vocab);
    if (s.kv_->wants_speculative_row()) {
      s.spec_prev_ = n_rows == 2 ? s.spec_next_ : -1;
      s.spec_next_ = n_rows == 2 ? argmax(l0 + n_vocab, (int)n_vocab) : argmax(l0, (int)n_vocab);
    }
    row += (size_t)n_rows;
    s.timings_.decode_ms += dt;
    s.timings_.decode_tokens += 1;
  }
}

void SessionBatch::decode(const std::vector<Session*>& sessions, const std::vector<int32_t>& tokens) {
  SPC_CHECK(sessions.size() == tokens.size(), "batched decode: %zu sessions but %zu tokens", sessions.size(),
            tokens.size());
  for (size_t i = 0; i < sessions.size(); ++i) SPC_CHECK(sessions[i] != nullptr, "batched decode: session %zu is null", i);
  Session::decode_together(sessions.data(), tokens.data(), (int)sessions.size(), scratch_, step_logits_);
}

}  // namespace spc
