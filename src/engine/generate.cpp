#include "engine/generate.h"

#include <algorithm>

#include "kv/kv_policy.h"
#include "util/error.h"

namespace spc {

std::string Utf8Stream::push(const std::string& bytes) {
  pending_ += bytes;
  // Find the start of a trailing incomplete sequence, if any.
  size_t n = pending_.size(), cut = n;
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const unsigned char c = (unsigned char)pending_[n - back];
    if ((c & 0xC0) == 0x80) continue;  // continuation byte
    const size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    if (need > back) cut = n - back;
    break;
  }
  std::string out = pending_.substr(0, cut);
  pending_.erase(0, cut);
  return out;
}

std::string Utf8Stream::flush() {
  std::string out;
  out.swap(pending_);
  return out;
}

namespace {

// One sequence's generation between decode steps: sample, stop or hand back the token to feed.
class Generation {
 public:
  Generation(Session& s, const Tokenizer& tok, const GenerateOptions& opt, SamplerConfig sc,
             const std::function<void(const std::string&)>& on_text)
      : s_(s), tok_(tok), opt_(opt), sampler_(sc), on_text_(on_text) {}

  // The token to decode next, or -1 when the sequence is done.
  int32_t next() {
    if (done_) return -1;
    const int32_t t = sampler_.sample(s_.logits().data(), (int)s_.logits().size());
    if (!opt_.ignore_eos && tok_.is_end_of_generation(t)) return finish(&res_.stopped_at_eos);
    res_.tokens.push_back(t);
    emit(stream_.push(tok_.token_to_piece(t)));
    if (opt_.n_predict >= 0 && (int64_t)res_.tokens.size() >= opt_.n_predict) return finish(nullptr);
    if (s_.n_past() >= s_.kv().geometry().n_ctx) return finish(&res_.stopped_at_context);
    return t;
  }
  GenerateResult take() {
    if (!done_) finish(nullptr);
    return std::move(res_);
  }

 private:
  int32_t finish(bool* flag) {
    if (flag) *flag = true;
    emit(stream_.flush());
    done_ = true;
    return -1;
  }
  void emit(const std::string& s) {
    res_.text += s;
    if (on_text_ && !s.empty()) on_text_(s);
  }

  Session& s_;
  const Tokenizer& tok_;
  const GenerateOptions& opt_;
  Sampler sampler_;
  const std::function<void(const std::string&)>& on_text_;
  Utf8Stream stream_;
  GenerateResult res_;
  bool done_ = false;
};

}  // namespace

GenerateResult generate(Session& session, const Tokenizer& tok, const GenerateOptions& opt,
                        const std::function<void(const std::string&)>& on_text) {
  Generation g(session, tok, opt, opt.sampler, on_text);
  if (opt.n_predict != 0)
    for (int32_t t = g.next(); t >= 0; t = g.next()) session.decode(t);
  return g.take();
}

int64_t prefill_sharing_prefixes(const std::vector<Session*>& sessions,
                                 const std::vector<std::vector<int32_t>>& prompts, int64_t min_shared,
                                 bool share_cache) {
  SPC_CHECK(sessions.size() == prompts.size(), "prefill: %zu sessions but %zu prompts", sessions.size(), prompts.size());
  int64_t taken = 0;
  for (size_t i = 0; i < sessions.size(); ++i) {
    Session& s = *sessions[i];
    const std::vector<int32_t>& p = prompts[i];
    SPC_CHECK(!p.empty(), "prefill: prompt %zu is empty", i);
    // The earlier prompt sharing the longest leading run; at least one token is left to
    // prefill (it gives the logits) unless the prompts are equal, whose logits come along.
    int64_t best = 0;
    size_t from = 0;
    if (s.n_past() == 0 && kv_policy_keeps_16bit_copy(s.kv().name())) {
      for (size_t j = 0; j < i; ++j) {
        if (!kv_policy_keeps_16bit_copy(sessions[j]->kv().name())) continue;
        const std::vector<int32_t>& q = prompts[j];
        int64_t n = 0;
        while (n < (int64_t)std::min(p.size(), q.size()) && p[(size_t)n] == q[(size_t)n]) ++n;
        const bool equal = n == (int64_t)p.size() && p.size() == q.size();
        if (!equal) n = std::min<int64_t>(n, (int64_t)p.size() - 1);
        if (n > best && sessions[j]->n_past() == (int64_t)q.size()) best = n, from = j;
      }
    }
    if (best >= min_shared) {
      s.prefill_from(*sessions[from], best, share_cache);
      taken += best;
      if (best < (int64_t)p.size()) s.prefill(std::vector<int32_t>(p.begin() + best, p.end()));
    } else {
      s.prefill(p);
    }
  }
  return taken;
}

std::vector<GenerateResult> generate_batch(const std::vector<Session*>& sessions, const Tokenizer& tok,
                                           const GenerateOptions& opt) {
  const std::function<void(const std::string&)> none;
  std::vector<Generation> gens;
  gens.reserve(sessions.size());
  for (size_t i = 0; i < sessions.size(); ++i) {
    SPC_CHECK(sessions[i] != nullptr, "generate_batch: session %zu is null", i);
    SamplerConfig sc = opt.sampler;
    sc.seed += i;
    gens.emplace_back(*sessions[i], tok, opt, sc, none);
  }
  SessionBatch batch;
  std::vector<Session*> step;
  std::vector<int32_t> toks;
  while (opt.n_predict != 0) {
    step.clear();
    toks.clear();
    for (size_t i = 0; i < gens.size(); ++i)
      if (const int32_t t = gens[i].next(); t >= 0) step.push_back(sessions[i]), toks.push_back(t);
    if (step.empty()) break;
    batch.decode(step, toks);
  }
  std::vector<GenerateResult> out;
  for (Generation& g : gens) out.push_back(g.take());
  return out;
}

}  // namespace spc
