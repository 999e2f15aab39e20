// Prompt construction and the measurement loop.
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <thread>

#include "bench/bench.h"
#include "engine/sampler.h"
#include "engine/session.h"
#include "engine/tokenizer.h"
#include "model/model.h"
#include "tier/rss.h"
#include "util/clock.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace spc::bench {

PromptSource build_prompt_tokens(const Tokenizer* tok, int n_vocab, const std::string& text, const std::string& path,
                                 int64_t n_tokens) {
  SPC_CHECK(n_vocab > 0, "prompt: empty vocabulary");
  PromptSource src;
  std::vector<int32_t>& out = src.tokens;
  out.reserve((size_t)n_tokens);
  if (tok && tok->add_bos_default() && tok->bos_id() >= 0) out.push_back(tok->bos_id());
  if (tok && !text.empty()) {
    // Tokenize in pieces that end at a line break (about 16 KiB each), wrapping around to the
    // start of the text as often as needed.
    size_t pos = 0;
    int64_t empty_rounds = 0;
    while ((int64_t)out.size() < n_tokens) {
      size_t end = std::min(text.size(), pos + 16384);
      const size_t nl = text.find('\n', end);
      end = nl == std::string::npos ? text.size() : nl + 1;
      const std::vector<int32_t> ids = tok->encode(std::string_view(text).substr(pos, end - pos), false, false);
      out.insert(out.end(), ids.begin(), ids.end());
      pos = end >= text.size() ? 0 : end;
      if (ids.empty() && ++empty_rounds > 4) break;  // text that tokenizes to nothing
    }
    if ((int64_t)out.size() >= n_tokens) {
      out.resize((size_t)n_tokens);
      src.kind = "text";
      src.path = path;
      return src;
    }
    out.clear();
    if (tok->add_bos_default() && tok->bos_id() >= 0) out.push_back(tok->bos_id());
  }
  src.kind = "synthetic";
  for (int64_t i = 0; (int64_t)out.size() < n_tokens; ++i) out.push_back((int32_t)(i % n_vocab));
  out.resize((size_t)n_tokens);
  return src;
}

namespace {

// What one (policy, depth, threads) configuration collected over its sessions.
struct Collected {
  std::vector<double> prefill_ms, decode_ms;
  std::vector<double> paired;  // interleaved: step time / the first policy's at the same step
  KvStats at_depth, after;
  double stall = 0, copy = 0, fetched = 0;
  DecodePhases phase_mark;  // the session's phase sums when its first measured step began
  DecodePhases phases;      // over the measured steps of all sessions (as many as decode_ms)
};

// Prefill of one session: its time, and the policy's statistics at depth.
void prefilled(Session& s, const std::vector<int32_t>& toks, Collected& c) {
  s.prefill(toks);
  c.prefill_ms.push_back(s.timings().prefill_ms);
  c.at_depth = s.kv().stats();
}

// One greedy decode step, timed; kept unless it is a warm-up step.
double timed_step(Session& s, int n_vocab, int i, int warmup, Collected& c) {
  const int32_t t = argmax(s.logits().data(), n_vocab);
  if (i == warmup) c.phase_mark = s.decode_phases();
  const double t0 = now_ms();
  s.decode(t);
  const double dt = now_ms() - t0;
  if (i >= warmup) c.decode_ms.push_back(dt);
  return dt;
}

// Decode-side statistics after a repetition's last step: the policy's (or a batch's summed) KV
// statistics and the phase sums the decode calls reached.
void finished_with(const KvStats& after, const DecodePhases& phases, int gen, Collected& c) {
  c.after = after;
  c.phases = c.phases + (phases - c.phase_mark);
  c.stall += after.stall_ms / gen;
  c.copy += after.copy_ms / gen;
  c.fetched += after.fetched_bytes_per_step;
}

// The session's decode-side statistics, added after its last step.
void finished(const Session& s, int gen, Collected& c) { finished_with(s.kv().stats(), s.decode_phases(), gen, c); }

// The time-local bandwidth probe (BenchOptions::probe_bytes) for the rows [first, end) of a
// measurement that just finished; nothing without it. A probe that fails here (its buffer cannot
// be allocated beside the sessions just measured) costs the rows their time-local floor, not the
// run: they keep the initial probe's.
void probe_rows(const BenchOptions& opt, int nt, std::vector<BenchRow>& rows, size_t first, const BenchLog& log) {
  if (opt.probe_bytes == 0) return;
  BandwidthResult b;
  try {
    b = probe_read_bandwidth(opt.probe_bytes, nt, opt.probe_passes);
  } catch (const Error& e) {
    if (log) log(strfmt("bandwidth probe after the row failed (%s): its floor uses the initial probe", e.what()));
    return;
  }
  for (size_t i = first; i < rows.size(); ++i) rows[i].bandwidth_gb_per_s = b.best_gb_per_s;
  if (log) log(strfmt("memory read bandwidth right after, %d thread(s): best %.2f GB/s", nt, b.best_gb_per_s));
}

// The cache size of a row's sessions: the prompt, the decoded tokens and SpeCache's guess row.
KvGeometry row_geometry(const Model& model, int64_t depth, int gen) { return model.kv_geometry(depth + gen + 2); }

// The KV statistics of a batch's sessions added up: sizes, bytes fetched per step and times (each
// step gives every session one token, so per-step sums are what the step moved and waited for).
KvStats sum_stats(const std::vector<KvStats>& v) {
  KvStats t = v.front();
  for (size_t i = 1; i < v.size(); ++i) {
    t.fast_bytes += v[i].fast_bytes;
    t.slow_bytes += v[i].slow_bytes;
    t.shared_bytes += v[i].shared_bytes;
    t.fetched_bytes_per_step += v[i].fetched_bytes_per_step;
    t.stall_ms += v[i].stall_ms;
    t.copy_ms += v[i].copy_ms;
  }
  return t;
}

// One repetition of a batched row: `batch` sessions of cfg holding the same prompt (the first
// prefilled, timed; the others take its K/V over, or a full session's where the policy keeps no
// 16-bit copy to hand on; with share, all but its last tokens as views of the first one's cache,
// then their own last tokens), then gen greedy steps of all of them together, each step timed.
void batched_rep(const Model& model, const KvConfig& cfg, const std::vector<int32_t>& toks, int batch, int gen,
                 int warmup, bool share, ThreadPool& pool, Collected& c) {
  const int n_vocab = model.config().n_vocab;
  const KvGeometry geom = row_geometry(model, (int64_t)toks.size(), gen);
  std::vector<std::unique_ptr<Session>> ss;
  std::vector<Session*> ptrs;
  for (int b = 0; b < batch; ++b) {
    ss.push_back(std::make_unique<Session>(model, make_kv_policy(cfg, geom), pool));
    ptrs.push_back(ss.back().get());
  }
  std::unique_ptr<Session> source;
  if (!kv_policy_keeps_16bit_copy(cfg.policy)) {
    KvConfig full = cfg;
    full.policy = "full";
    source = std::make_unique<Session>(model, make_kv_policy(full, geom), pool);
    source->prefill(toks);
    c.prefill_ms.push_back(source->timings().prefill_ms);
  } else {
    ss[0]->prefill(toks);
    c.prefill_ms.push_back(ss[0]->timings().prefill_ms);
  }
  // Shared (N questions about one document): each later sequence takes all but the last q_len
  // positions over and prefills its own last q_len tokens, a slice from elsewhere in the prompt,
  // so that the sequences decode different tokens and select different top-k rows, as different
  // questions would (identical sequences would fetch the same rows, which a shared store then
  // serves from one read).
  const int64_t n = (int64_t)toks.size(), q_len = std::min<int64_t>(32, n / 4);
  for (int b = source ? 0 : 1; b < batch; ++b) {
    Session& s = *ss[(size_t)b];
    if (source) {  // kivi, streaming: copies (they keep no 16-bit copy to share from)
      s.prefill_from(*source);
    } else if (!share || q_len == 0) {
      s.prefill_from(*ss[0], -1, share);
    } else {
      s.prefill_from(*ss[0], n - q_len, /*share=*/true);
      const int64_t from = (int64_t)b * 7919 % (n - q_len);
      s.prefill(std::vector<int32_t>(toks.begin() + from, toks.begin() + from + q_len));
    }
  }
  if (source) {  // its 16-bit cache is the bench's scaffolding, not the row's: out of the peak
    source.reset();
    reset_peak_rss();
  }
  std::vector<KvStats> st;
  for (const auto& s : ss) st.push_back(s->kv().stats());
  c.at_depth = sum_stats(st);
  SessionBatch sb;
  std::vector<int32_t> next((size_t)batch);
  for (int i = 0; i < gen; ++i) {
    for (int b = 0; b < batch; ++b) next[(size_t)b] = argmax(ss[(size_t)b]->logits().data(), n_vocab);
    if (i == warmup) c.phase_mark = sb.phases();
    const double t0 = now_ms();
    sb.decode(ptrs, next);
    const double dt = now_ms() - t0;
    if (i >= warmup) c.decode_ms.push_back(dt);
  }
  st.clear();
  for (const auto& s : ss) st.push_back(s->kv().stats());
  finished_with(sum_stats(st), sb.phases(), gen, c);
}

BenchRow make_row(const std::string& model_name, const PolicySpec& spec, const KvConfig& cfg, int64_t depth, int nt,
                  const BenchOptions& opt, uint64_t wbytes, Collected& c, bool rss_reset, int batch = 1) {
  BenchRow row;
  row.batch = batch;
  row.batch_share = batch > 1 && c.at_depth.shared_bytes > 0;  // what happened (kivi, streaming: copies)
  row.model = model_name;
  row.policy_spec = spec.text;
  row.policy = cfg.policy;
  row.bits = reported_bits(cfg);
  row.depth = depth;
  row.threads = nt;
  row.reps = opt.reps;
  row.gen = opt.gen;
  row.peak_rss_reset = rss_reset;
  c.after.fetched_bytes_per_step = c.fetched / opt.reps;
  row.prefill_ms = summarize(c.prefill_ms).median;
  row.prefill_tok_per_s = row.prefill_ms > 0 ? (double)depth * 1000.0 / row.prefill_ms : 0;
  row.decode_ms = summarize(c.decode_ms);
  row.decode_samples = c.decode_ms.size();
  row.bytes = token_bytes(wbytes, c.at_depth, c.after);
  row.achieved_gb_per_s = row.decode_ms.median > 0 ? row.bytes.total() / (row.decode_ms.median * 1e6) : 0;
  row.batch_tok_per_s = row.decode_ms.median > 0 ? batch * 1000.0 / row.decode_ms.median : 0;
  row.kv_fast_bytes = c.after.fast_bytes;
  row.kv_slow_bytes = c.after.slow_bytes;
  row.stall_ms_per_token = c.stall / opt.reps;
  row.copy_ms_per_token = c.copy / opt.reps;
  row.peak_rss_bytes = peak_rss_bytes();
  if (!c.paired.empty()) row.paired_ratio = summarize(c.paired).median;
  if (!c.decode_ms.empty()) {
    const int64_t steps = (int64_t)c.decode_ms.size();
    const double n = (double)steps;
    const DecodePhases& p = c.phases;
    row.phases_ms = DecodePhases{p.qkv_ms / n, p.attend_ms / n, p.wo_ms / n, p.ffn_ms / n, p.end_step_ms / n,
                                 p.output_ms / n, steps};
  }
  return row;
}

}  // namespace

void validate_batches(const BenchOptions& opt) {
  SPC_CHECK(!opt.batches.empty(), "--batch: empty batch list");
  for (int b : opt.batches) SPC_CHECK(b >= 1 && b <= 256, "--batch: %d sequences is not within 1..256", b);
  SPC_CHECK(!(opt.interleave && (opt.batches.size() > 1 || opt.batches[0] != 1)),
            "--interleave measures one sequence per policy; it does not take --batch");
  SPC_CHECK(!opt.batch_share || *std::max_element(opt.batches.begin(), opt.batches.end()) > 1,
            "--batch-share needs a batch size above 1 (--batch)");
}

void run_bench(const Model& model, const Tokenizer* tok, const BenchOptions& opt, const std::string& text,
               const std::string& text_path, BenchReport& report, const BenchLog& log) {
  SPC_CHECK(!opt.policies.empty() && !opt.depths.empty() && !opt.threads.empty(), "bench: empty policy/depth/thread list");
  SPC_CHECK(opt.reps >= 1 && opt.gen >= 1 && opt.warmup >= 0, "bench: reps and gen must be >= 1");
  validate_batches(opt);
  const ModelConfig& mc = model.config();
  const int64_t max_depth = *std::max_element(opt.depths.begin(), opt.depths.end());
  const PromptSource prompt = build_prompt_tokens(tok, mc.n_vocab, text, text_path, max_depth);
  report.model_path = opt.model_path;
  report.prompt_kind = prompt.kind;
  report.prompt_path = prompt.path;
  report.build = build_info();
  report.cpu = cpu_model_name();
  report.hardware_threads = (int)std::thread::hardware_concurrency();
  report.decode_act = model.int8_decode() ? "int8" : "fp32";
  report.prefill_act = model.int8_prefill() ? "int8" : "fp32";
  report.prefill_attn = Model::prefill_attn_name(model.prefill_attn());
  report.interleaved = opt.interleave;
  // With gen <= warmup nothing would be left: keep at least the last step.
  const int warmup = std::min(opt.warmup, opt.gen - 1);
  report.measurement = strfmt(
      "per (policy, depth, threads): %d fresh session(s); each prefills `depth` prompt tokens once, then decodes %d "
      "tokens greedily; decode statistics over the per-token times of all sessions with the first %d step(s) of each "
      "excluded as warm-up; prefill figures are the median over sessions",
      opt.reps, opt.gen, warmup);
  if (opt.probe_bytes > 0)
    report.measurement +=
        "; floor: bytes per token over the read bandwidth probed right after the row's decode steps";
  if (opt.batches.size() > 1 || opt.batches[0] != 1)
    report.measurement +=
        "; batch B > 1: B sessions of the policy hold the same prompt (the first prefilled and timed, the others "
        "take its K/V over) and decode together, one token each per step; the decode times are per step";
  if (opt.batch_share)
    report.measurement +=
        "; shared (rows \"POLICY xBs\"): the later sessions read all but the last min(32, depth/4) prompt "
        "positions from the first one's cache instead of a copy and prefill their own last tokens (a slice from "
        "elsewhere in the prompt), as N questions about one document; kivi and streaming copy";
  if (opt.interleave)
    report.measurement +=
        "; interleaved: per (depth, threads, repetition) one session of every policy, all prefilled, then each "
        "decode step runs once in every session in turn, so a slow spell of the machine hits all policies alike; "
        "paired_ratio is the median over steps of a policy's step time over the first policy's at the same step; "
        "peak RSS covers all the sessions of a depth";
  const uint64_t wbytes = model.weight_bytes_per_token();
  const std::string model_name = opt.model_path.substr(opt.model_path.find_last_of('/') + 1);
  auto session_for = [&](const KvConfig& cfg, int64_t depth, ThreadPool& pool) {
    return std::make_unique<Session>(model, make_kv_policy(cfg, row_geometry(model, depth, opt.gen)), pool);
  };

  for (int nt : opt.threads) {
    ThreadPool pool(nt);
    if (opt.interleave) {
      const size_t np = opt.policies.size();
      std::vector<KvConfig> cfgs;
      for (const PolicySpec& spec : opt.policies) cfgs.push_back(apply_policy_spec(opt.kv, spec));
      for (int64_t depth : opt.depths) {
        const bool rss_reset = reset_peak_rss();
        const std::vector<int32_t> toks(prompt.tokens.begin(), prompt.tokens.begin() + depth);
        std::vector<Collected> col(np);
        for (int rep = 0; rep < opt.reps; ++rep) {
          std::vector<std::unique_ptr<Session>> ss;
          for (size_t p = 0; p < np; ++p) {
            ss.push_back(session_for(cfgs[p], depth, pool));
            prefilled(*ss[p], toks, col[p]);
          }
          for (int i = 0; i < opt.gen; ++i) {
            double first = 0;
            for (size_t p = 0; p < np; ++p) {
              const double dt = timed_step(*ss[p], mc.n_vocab, i, warmup, col[p]);
              if (p == 0) first = dt;
              if (i >= warmup && first > 0) col[p].paired.push_back(dt / first);
            }
          }
          for (size_t p = 0; p < np; ++p) finished(*ss[p], opt.gen, col[p]);
          if (log)
            log(strfmt("interleaved depth %lld, %d thread(s), rep %d/%d: %zu sessions", (long long)depth, nt, rep + 1,
                       opt.reps, np));
        }
        const size_t first_row = report.rows.size();
        for (size_t p = 0; p < np; ++p) {
          report.rows.push_back(make_row(model_name, opt.policies[p], cfgs[p], depth, nt, opt, wbytes, col[p], rss_reset));
          const BenchRow& row = report.rows.back();
          if (log)
            log(strfmt("%s depth %lld, %d thread(s): decode %.3f ms/token (median of %zu), %.3fx %s (paired)",
                       row.policy_spec.c_str(), (long long)depth, nt, row.decode_ms.median, row.decode_samples,
                       row.paired_ratio, opt.policies[0].text.c_str()));
        }
        probe_rows(opt, nt, report.rows, first_row, log);
      }
      continue;
    }
    for (const PolicySpec& spec : opt.policies) {
      const KvConfig cfg = apply_policy_spec(opt.kv, spec);
      for (int64_t depth : opt.depths) {
        const std::vector<int32_t> toks(prompt.tokens.begin(), prompt.tokens.begin() + depth);
        for (int batch : opt.batches) {
          const bool rss_reset = reset_peak_rss();
          Collected c;
          for (int rep = 0; rep < opt.reps; ++rep) {
            if (batch > 1) {
              batched_rep(model, cfg, toks, batch, opt.gen, warmup, opt.batch_share, pool, c);
            } else {
              auto s = session_for(cfg, depth, pool);
              prefilled(*s, toks, c);
              for (int i = 0; i < opt.gen; ++i) timed_step(*s, mc.n_vocab, i, warmup, c);
              finished(*s, opt.gen, c);
            }
            if (log)
              log(strfmt("%s depth %lld, %d thread(s)%s, rep %d/%d: prefill %.0f ms", spec.text.c_str(),
                         (long long)depth, nt, batch > 1 ? strfmt(", batch %d", batch).c_str() : "", rep + 1,
                         opt.reps, c.prefill_ms.back()));
          }
          report.rows.push_back(make_row(model_name, spec, cfg, depth, nt, opt, wbytes, c, rss_reset, batch));
          probe_rows(opt, nt, report.rows, report.rows.size() - 1, log);
          const BenchRow& row = report.rows.back();
          if (log && batch > 1)
            log(strfmt("%s depth %lld, %d thread(s), batch %d: decode %.3f ms/step (median of %zu), %.1f tok/s in all",
                       spec.text.c_str(), (long long)depth, nt, batch, row.decode_ms.median, row.decode_samples,
                       row.batch_tok_per_s));
          else if (log)
            log(strfmt("%s depth %lld, %d thread(s): prefill %.1f tok/s, decode %.3f ms/token (median of %zu)",
                       spec.text.c_str(), (long long)depth, nt, row.prefill_tok_per_s, row.decode_ms.median,
                       row.decode_samples));
        }
      }
    }
  }
  apply_bandwidth(report);
}

void apply_bandwidth(BenchReport& report) {
  if (report.bandwidth.empty()) return;
  for (BenchRow& row : report.rows) {
    if (row.bandwidth_gb_per_s <= 0) {  // no probe of its own
      const BandwidthResult* best = nullptr;
      for (const auto& b : report.bandwidth)
        if (!best || std::abs(b.threads - row.threads) < std::abs(best->threads - row.threads)) best = &b;
      row.bandwidth_gb_per_s = best->best_gb_per_s;
    }
    row.floor_ms = row.bandwidth_gb_per_s > 0 ? row.bytes.total() / (row.bandwidth_gb_per_s * 1e6) : 0;
    row.floor_ratio = row.floor_ms > 0 ? row.decode_ms.median / row.floor_ms : 0;
  }
}

}  // namespace spc::bench
