// Metrics and the evaluation grid: prefill once per case with `full`, decode under every policy.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>

#include "engine/generate.h"
#include "engine/sampler.h"
#include "eval/eval.h"
#include "model/model.h"
#include "util/clock.h"
#include "util/error.h"

namespace spc::eval {

// ---- metrics ---------------------------------------------------------------------------

std::vector<double> log_softmax(const float* logits, int n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int i = 0; i < n; ++i) m = std::max(m, (double)logits[i]);
  double s = 0;
  for (int i = 0; i < n; ++i) s += std::exp((double)logits[i] - m);
  const double lse = m + std::log(s);
  std::vector<double> out((size_t)n);
  for (int i = 0; i < n; ++i) out[(size_t)i] = (double)logits[i] - lse;
  return out;
}

double nll(const float* logits, int n, int32_t token) {
  SPC_CHECK(token >= 0 && token < n, "token %d outside the vocabulary", token);
  return -log_softmax(logits, n)[(size_t)token];
}

double kl_divergence_logp(const std::vector<double>& logp, const float* q_logits, int n) {
  const std::vector<double> logq = log_softmax(q_logits, n);
  double kl = 0;
  for (int i = 0; i < n; ++i) {
    const double lp = logp[(size_t)i];
    if (lp > -700) kl += std::exp(lp) * (lp - logq[(size_t)i]);
  }
  return std::max(0.0, kl);
}

double kl_divergence(const float* p_logits, const float* q_logits, int n) {
  return kl_divergence_logp(log_softmax(p_logits, n), q_logits, n);
}

GreedyAgreement greedy_agreement(const std::vector<int32_t>& ref, const std::vector<int32_t>& got) {
  GreedyAgreement a;
  if (ref.empty()) return a;
  size_t prefix = 0, same = 0;
  bool diverged = false;
  for (size_t i = 0; i < ref.size(); ++i) {
    const bool eq = i < got.size() && got[i] == ref[i];
    same += eq;
    if (!eq) diverged = true;
    if (!diverged) ++prefix;
  }
  a.prefix = (double)prefix / (double)ref.size();
  a.positional = (double)same / (double)ref.size();
  return a;
}

void teacher_force(Session& s, const std::vector<int32_t>& tokens,
                   const std::function<void(size_t, const std::vector<float>&)>& on_logits, bool skip_last_decode) {
  for (size_t i = 0; i < tokens.size(); ++i) {
    on_logits(i, s.logits());
    if (!(skip_last_decode && i + 1 == tokens.size())) s.decode(tokens[i]);
  }
}

std::vector<int32_t> greedy_tokens(Session& s, int n) {
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) {
    const int32_t t = argmax(s.logits().data(), (int)s.logits().size());
    out.push_back(t);
    if (i + 1 < n) s.decode(t);
  }
  return out;
}

// ---- the grid --------------------------------------------------------------------------

namespace {

bool has_task(const EvalOptions& o, const char* t) {
  return std::find(o.tasks.begin(), o.tasks.end(), t) != o.tasks.end();
}

void fill_session_info(CaseResult& c, const Session& s) {
  c.stats = s.kv().stats();
  const SessionTimings& t = s.timings();
  c.decode_ms_per_token = t.decode_tokens ? t.decode_ms / (double)t.decode_tokens : 0;
  if (s.guesses().checked) c.metrics["guess_hit_rate"] = s.guesses().hit_rate();
}

// Tokens at the start of `prompt` that `cached` holds at the same positions, leaving at least the
// last token of the prompt to prefill (its logits start the case).
int64_t shared_prefix(const std::vector<int32_t>& cached, const std::vector<int32_t>& prompt) {
  const size_t lim = std::min(cached.size(), prompt.empty() ? 0 : prompt.size() - 1);
  size_t n = 0;
  while (n < lim && cached[n] == prompt[n]) ++n;
  return (int64_t)n;
}

std::string one_line(std::string s) {
  for (char& ch : s)
    if (ch == '\n' || ch == '\r' || ch == '\t') ch = ' ';
  return s;
}

}  // namespace

void check_tasks(const std::vector<std::string>& tasks) {
  for (const auto& t : tasks)
    SPC_CHECK(t == "passkey" || t == "niah" || t == "ppl" || t == "agree", "unknown task '%s' (passkey, niah, ppl, agree)",
              t.c_str());
}

std::vector<CaseResult> run_eval(const Model& model, const Tokenizer& tok, ThreadPool& pool, const EvalOptions& o,
                                 const ResultSink& on_result) {
  check_tasks(o.tasks);
  SPC_CHECK(!o.policies.empty(), "no policies to evaluate");
  std::vector<CaseResult> results;
  auto emit = [&](CaseResult c) {
    if (on_result) on_result(c);
    results.push_back(std::move(c));
  };
  const int margin = std::max({o.gen, o.ppl_tokens, o.agree_tokens}) + 8;
  const int n_vocab = model.config().n_vocab;
  KvConfig full_cfg;
  full_cfg.policy = "full";

  if (o.verbose && std::any_of(o.policies.begin(), o.policies.end(), [](const PolicySpec& p) { return p.kv.policy == "streaming"; }))
    for (int64_t L : o.lengths) {
      const KvConfig kv = config_for_length(
          *std::find_if(o.policies.begin(), o.policies.end(), [](const PolicySpec& p) { return p.kv.policy == "streaming"; }), L);
      std::fprintf(stderr, "eval: streaming at %lld tokens: budget %d positions (sinks %d + window %d) = specache:1's fast tier\n",
                   (long long)L, kv.sinks + kv.window, kv.sinks, kv.window);
    }

  // Retrieval tasks: one prefill per (task, length, depth). Consecutive cases (the depths of one
  // length) share the haystack before the earlier needle: the previous case's full session hands
  // that prompt prefix over and only the rest is prefilled (a continued prefill gives the same
  // K/V and logits as a whole one, so results do not depend on it).
  std::unique_ptr<Session> prev;
  for (const char* task : {"passkey", "niah"}) {
    if (!has_task(o, task)) continue;
    const bool niah = std::string(task) == "niah";
    if (niah) SPC_CHECK(!o.haystack.empty(), "niah needs a haystack text");
    for (uint64_t seed : o.seeds)
    for (int64_t L : o.lengths)
      for (size_t di = 0; di < o.depths.size(); ++di) {
        TaskPrompt p;
        if (niah) {
          NiahOptions no = o.niah;
          no.length = L, no.depth = o.depths[di], no.seed = seed, no.depth_index = (int)di;
          p = make_niah(tok, o.haystack, no);
        } else {
          p = make_passkey(tok, PasskeyOptions{L, o.depths[di], seed, (int)di});
        }
        const auto geom = model.kv_geometry((int64_t)(p.tokens.size() + p.answer_tokens.size()) + margin);
        auto full_s = std::make_unique<Session>(model, make_kv_policy(full_cfg, geom), pool);
        Session& full = *full_s;
        const int64_t reused = prev && o.share_prefix ? shared_prefix(prev->sequence(), p.tokens) : 0;
        const double t0 = now_s();
        if (reused > 0) full.prefill_from(*prev, reused);
        full.prefill(std::vector<int32_t>(p.tokens.begin() + reused, p.tokens.end()));
        const double prefill_ms = (now_s() - t0) * 1000;
        if (o.verbose)
          std::fprintf(stderr, "eval: %s seed=%llu L=%lld depth=%.2f: %zu tokens (%lld shared with the previous case), "
                       "prefill %.1f s, answer %s\n", task, (unsigned long long)seed, (long long)L, o.depths[di],
                       p.tokens.size(), (long long)reused, prefill_ms / 1000, p.answer.c_str());
        for (const auto& spec : o.policies) {
          CaseResult c;
          c.task = task, c.policy = spec.label, c.length = L, c.prompt_tokens = (int64_t)p.tokens.size();
          c.depth = o.depths[di], c.seed = (int64_t)seed, c.answer = p.answer, c.kv = config_for_length(spec, L), c.prefill_ms = prefill_ms;
          c.prefill_reused = reused;
          Session s(model, make_kv_policy(c.kv, geom), pool);
          s.prefill_from(full);
          GenerateOptions go;
          go.n_predict = o.gen;
          go.sampler.temp = 0;
          const GenerateResult g = generate(s, tok, go);
          c.output = g.text;
          c.score = score_contains(g.text, p.answer) ? 1 : 0;
          fill_session_info(c, s);
          // The answer teacher-forced: a graded view of the same retrieval (how many of its
          // tokens the policy ranks first, and their mean negative log-likelihood).
          Session a(model, make_kv_policy(c.kv, geom), pool);
          a.prefill_from(full);
          double nll_sum = 0;
          size_t top1 = 0;
          teacher_force(a, p.answer_tokens, [&](size_t i, const std::vector<float>& lg) {
            nll_sum += nll(lg.data(), n_vocab, p.answer_tokens[i]);
            top1 += argmax(lg.data(), n_vocab) == p.answer_tokens[i];
          });
          const double na = (double)p.answer_tokens.size();
          c.metrics["answer_top1"] = na > 0 ? (double)top1 / na : 0;
          c.metrics["answer_nll"] = na > 0 ? nll_sum / na : 0;
          if (o.verbose)
            std::fprintf(stderr, "  %-18s %s  \"%s\"\n", spec.label.c_str(), c.score > 0 ? "ok  " : "FAIL", one_line(g.text).c_str());
          emit(std::move(c));
        }
        prev = std::move(full_s);
      }
  }
  prev.reset();

  // ppl and agree share one prefill per length: the first (length - ppl_tokens) tokens of the text.
  if (has_task(o, "ppl") || has_task(o, "agree")) {
    SPC_CHECK(!o.haystack.empty(), "ppl/agree need a text");
    for (int64_t L : o.lengths) {
      SPC_CHECK(L > o.ppl_tokens, "length %lld must exceed --ppl-tokens %d", (long long)L, o.ppl_tokens);
      const std::vector<int32_t> text = text_tokens(tok, o.haystack, L);
      const std::vector<int32_t> prefix(text.begin(), text.end() - o.ppl_tokens);
      const std::vector<int32_t> cont(text.end() - o.ppl_tokens, text.end());
      const auto geom = model.kv_geometry((int64_t)prefix.size() + margin);
      Session full(model, make_kv_policy(full_cfg, geom), pool);
      const double t0 = now_s();
      full.prefill(prefix);
      const double prefill_ms = (now_s() - t0) * 1000;
      if (o.verbose)
        std::fprintf(stderr, "eval: ppl/agree L=%lld: prefix %zu tokens, prefill %.1f s\n", (long long)L, prefix.size(),
                     prefill_ms / 1000);

      // full's greedy continuation and its distributions.
      std::vector<int32_t> ref;
      std::vector<std::vector<double>> ref_logp;
      if (has_task(o, "agree")) {
        Session r(model, make_kv_policy(full_cfg, geom), pool);
        r.prefill_from(full);
        for (int i = 0; i < o.agree_tokens; ++i) {
          ref_logp.push_back(log_softmax(r.logits().data(), n_vocab));
          ref.push_back(argmax(r.logits().data(), n_vocab));
          if (i + 1 < o.agree_tokens) r.decode(ref.back());
        }
      }

      for (const auto& spec : o.policies) {
        const KvConfig kv = config_for_length(spec, L);
        if (has_task(o, "ppl")) {
          CaseResult c;
          c.task = "ppl", c.policy = spec.label, c.length = L, c.prompt_tokens = (int64_t)prefix.size(), c.kv = kv;
          c.prefill_ms = prefill_ms;
          Session s(model, make_kv_policy(kv, geom), pool);
          s.prefill_from(full);
          double sum = 0;
          teacher_force(s, cont, [&](size_t i, const std::vector<float>& lg) { sum += nll(lg.data(), n_vocab, cont[i]); });
          const double mean = sum / (double)cont.size();
          c.score = std::exp(mean);
          c.metrics = {{"nll", mean}, {"ppl", c.score}, {"tokens", (double)cont.size()}};
          fill_session_info(c, s);
          if (o.verbose) std::fprintf(stderr, "  ppl   %-18s %.4f\n", spec.label.c_str(), c.score);
          emit(std::move(c));
        }
        if (has_task(o, "agree")) {
          CaseResult c;
          c.task = "agree", c.policy = spec.label, c.length = L, c.prompt_tokens = (int64_t)prefix.size(), c.kv = kv;
          c.prefill_ms = prefill_ms;
          Session s(model, make_kv_policy(kv, geom), pool);
          s.prefill_from(full);
          double kl_sum = 0, kl_max = 0;
          size_t top1 = 0;
          teacher_force(s, ref, [&](size_t i, const std::vector<float>& lg) {
            const double kl = kl_divergence_logp(ref_logp[i], lg.data(), n_vocab);
            kl_sum += kl, kl_max = std::max(kl_max, kl);
            top1 += argmax(lg.data(), n_vocab) == ref[i];
          });
          fill_session_info(c, s);
          Session f(model, make_kv_policy(kv, geom), pool);
          f.prefill_from(full);
          const std::vector<int32_t> got = greedy_tokens(f, o.agree_tokens);
          const GreedyAgreement ga = greedy_agreement(ref, got);
          const double n = (double)ref.size();
          c.score = kl_sum / n;
          c.metrics = {{"kl_mean", kl_sum / n}, {"kl_max", kl_max}, {"top1", (double)top1 / n},
                       {"greedy_prefix", ga.prefix}, {"greedy_match", ga.positional}, {"tokens", n}};
          c.output = tok.decode(got);
          if (o.verbose)
            std::fprintf(stderr, "  agree %-18s KL %.5f top1 %.3f greedy prefix %.3f match %.3f\n", spec.label.c_str(),
                         kl_sum / n, (double)top1 / n, ga.prefix, ga.positional);
          emit(std::move(c));
        }
      }
    }
  }
  return results;
}

}  // namespace spc::eval
