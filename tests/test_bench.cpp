// specache bench: byte accounting, writers, bandwidth probe, policy specs. No timing assertions.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>

#include "bench/bench.h"
#include "core/dtype.h"
#include "engine/session.h"
#include "engine/tokenizer.h"
#include "kv/kv_policy.h"
#include "model/model.h"
#include "test_util.h"
#include "util/error.h"
#include "util/threadpool.h"

using namespace spc;
using namespace spc::bench;

namespace {

std::string stories_path() { return shared_path("models/stories260K/stories260K.gguf"); }

// Splits one CSV line (RFC 4180 quoting) into fields.
std::vector<std::string> csv_split(const std::string& line) {
  std::vector<std::string> out(1);
  bool quoted = false;
  for (size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
        out.back() += '"';
        ++i;
      } else if (c == '"') {
        quoted = false;
      } else {
        out.back() += c;
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      out.emplace_back();
    } else {
      out.back() += c;
    }
  }
  return out;
}

std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> out;
  size_t b = 0;
  while (b < s.size()) {
    const size_t e = s.find('\n', b);
    out.push_back(s.substr(b, e - b));
    if (e == std::string::npos) break;
    b = e + 1;
  }
  return out;
}

size_t count(const std::string& s, const std::string& needle) {
  size_t n = 0;
  for (size_t p = s.find(needle); p != std::string::npos; p = s.find(needle, p + 1)) ++n;
  return n;
}

// A small report made by hand (two policies x two depths), for the writers.
BenchReport fake_report(bool with_bandwidth) {
  BenchReport r;
  r.model_path = "/models/x.gguf";
  r.prompt_kind = "text";
  r.prompt_path = "/data/a, \"quoted\" path.txt";
  r.build = build_info();
  r.cpu = "Test CPU";
  r.hardware_threads = 2;
  r.measurement = "fake";
  if (with_bandwidth) r.bandwidth.push_back(BandwidthResult{2, 1 << 20, 3, 20.0, 19.0});
  int i = 0;
  for (const char* spec : {"full", "specache:2"})
    for (int64_t depth : {512, 2048}) {
      BenchRow row;
      row.model = "x.gguf";
      row.policy_spec = spec;
      row.policy = parse_policy_spec(spec).policy;
      row.bits = parse_policy_spec(spec).bits;
      row.depth = depth;
      row.threads = 2;
      row.reps = 1;
      row.gen = 8;
      row.decode_samples = 6;
      row.prefill_ms = 100 + i;
      row.prefill_tok_per_s = depth * 1000.0 / row.prefill_ms;
      row.decode_ms = summarize({1.0 + i, 1.5 + i, 2.0 + i, 1.2 + i, 1.1 + i, 1.3 + i});
      row.bytes = TokenBytes{80'000'000, (uint64_t)depth * 1000, i * 10.0};
      row.achieved_gb_per_s = row.bytes.total() / (row.decode_ms.median * 1e6);
      row.peak_rss_bytes = 123456789;
      r.rows.push_back(row);
      ++i;
    }
  apply_bandwidth(r);
  return r;
}

}  // namespace

TEST(BenchPolicySpec, ParsesNameAndBits) {
  const PolicySpec s = parse_policy_spec("specache:2");
  EXPECT_EQ(s.policy, "specache");
  EXPECT_EQ(s.bits, 2);
  EXPECT_EQ(s.text, "specache:2");
  const PolicySpec f = parse_policy_spec("full");
  EXPECT_EQ(f.policy, "full");
  EXPECT_EQ(f.bits, 0);
  EXPECT_EQ(parse_policy_spec("specache-exact:1").policy, "specache-exact");
  EXPECT_EQ(parse_policy_spec("topk-oracle:1").bits, 1);

  KvConfig defaults;
  defaults.bits = 1;
  defaults.topk = 32;
  const KvConfig c = apply_policy_spec(defaults, s);
  EXPECT_EQ(c.policy, "specache");
  EXPECT_EQ(c.bits, 2);
  EXPECT_EQ(c.topk, 32);
  EXPECT_EQ(apply_policy_spec(defaults, parse_policy_spec("kivi")).bits, 1);  // default kept
  EXPECT_EQ(reported_bits(apply_policy_spec(defaults, f)), 0);
  EXPECT_EQ(reported_bits(c), 2);

  const auto list = parse_policy_list("full, specache:1,kivi:2");
  ASSERT_EQ(list.size(), 3u);
  EXPECT_EQ(list[1].policy, "specache");
  EXPECT_EQ(list[2].bits, 2);
}

TEST(BenchPolicySpec, RejectsBadSpecs) {
  EXPECT_THROW(parse_policy_spec("bad:x"), Error);
  EXPECT_THROW(parse_policy_spec("specache:3"), Error);
  EXPECT_THROW(parse_policy_spec(":1"), Error);
  EXPECT_THROW(parse_policy_spec("Spe cache"), Error);
  EXPECT_THROW(parse_policy_spec("full:1"), Error);  // no low-bit copy
  EXPECT_THROW(parse_policy_list("full,,kivi"), Error);
  // Syntactically fine but not a policy: make_kv_policy's error, naming the spec.
  try {
    validate_policy_specs({parse_policy_spec("no-such-policy")}, KvConfig{});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no-such-policy"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(validate_policy_specs({parse_policy_spec("full")}, KvConfig{}));
}

TEST(BenchIntList, Parses) {
  EXPECT_EQ(parse_int_list("512,2048, 8192", "--depths"), (std::vector<int64_t>{512, 2048, 8192}));
  EXPECT_THROW(parse_int_list("512,x", "--depths"), Error);
  EXPECT_THROW(parse_int_list("0", "--depths"), Error);
  EXPECT_THROW(parse_int_list("-1", "--depths"), Error);
  EXPECT_THROW(parse_int_list("", "--depths"), Error);
}

TEST(BenchSummary, Quantiles) {
  const Spread s = summarize({5, 1, 3, 2, 4});
  EXPECT_EQ(s.n, 5u);
  EXPECT_DOUBLE_EQ(s.median, 3);
  EXPECT_DOUBLE_EQ(s.min, 1);
  EXPECT_DOUBLE_EQ(s.max, 5);
  EXPECT_DOUBLE_EQ(s.p25, 2);
  EXPECT_DOUBLE_EQ(s.p75, 4);
  EXPECT_DOUBLE_EQ(s.mean, 3);
  EXPECT_DOUBLE_EQ(summarize({1, 2}).median, 1.5);
  EXPECT_EQ(summarize({}).n, 0u);
}

TEST(BenchBytes, WeightsAreEveryMatrixPlusOneEmbeddingRow) {
  SKIP_IF_MISSING(stories_path());
  auto m = Model::load(stories_path());
  const GgufFile& f = m->gguf();
  uint64_t expected = 0;
  const GgufTensorInfo* embd = f.find_tensor("token_embd.weight");
  ASSERT_NE(embd, nullptr);
  expected += row_size(embd->type, embd->ne[0]);
  const GgufTensorInfo* out = f.find_tensor("output.weight");
  expected += out ? out->nbytes : embd->nbytes;  // tied output reads the embedding matrix
  const std::regex matrix(R"(blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight)");
  int n_matrices = 0;
  for (const auto& t : f.tensors())
    if (std::regex_match(t.name, matrix)) {
      expected += t.nbytes;
      ++n_matrices;
    }
  EXPECT_EQ(n_matrices, 7 * m->config().n_layer);
  EXPECT_EQ(m->weight_bytes_per_token(), expected);
  KvStats none;
  EXPECT_EQ(token_bytes(m->weight_bytes_per_token(), none, none).weights, expected);
}

TEST(BenchBytes, FullPolicyStreamsTheWhole16BitCache) {
  SKIP_IF_MISSING(stories_path());
  auto m = Model::load(stories_path());
  const ModelConfig& mc = m->config();
  ThreadPool pool(2);
  const int64_t depth = 40;
  const KvGeometry g = m->kv_geometry(depth + 8);
  Session s(*m, make_kv_policy(KvConfig{}, g), pool);
  std::vector<int32_t> prompt;
  for (int64_t i = 0; i < depth; ++i) prompt.push_back((int32_t)(1 + i % (mc.n_vocab - 1)));
  s.prefill(prompt);
  const KvStats at = s.kv().stats();
  const uint64_t expected = (uint64_t)depth * mc.n_layer * mc.n_head_kv * mc.head_dim * 2 * 2;
  EXPECT_EQ(full_kv_bytes(g, depth), expected);
  const TokenBytes b = token_bytes(m->weight_bytes_per_token(), at, at);
  EXPECT_EQ(b.kv_fast, expected);
  EXPECT_EQ(b.kv_slow, 0.0);
  EXPECT_DOUBLE_EQ(b.total(), (double)(m->weight_bytes_per_token() + expected));
}

TEST(BenchWriters, CsvHasHeaderAndOneLinePerRow) {
  for (bool bw : {false, true}) {
    const BenchReport r = fake_report(bw);
    const auto lines = lines_of(to_csv(r));
    ASSERT_EQ(lines.size(), 1 + r.rows.size());
    const auto header = csv_split(lines[0]);
    EXPECT_EQ(header, csv_columns());
    for (size_t i = 1; i < lines.size(); ++i) {
      const auto f = csv_split(lines[i]);
      ASSERT_EQ(f.size(), header.size()) << lines[i];
      EXPECT_EQ(f[1], r.rows[i - 1].policy_spec);
      const size_t floor_col = std::find(header.begin(), header.end(), "floor_ms") - header.begin();
      ASSERT_LT(floor_col, header.size());
      EXPECT_EQ(f[floor_col].empty(), !bw);
    }
    EXPECT_NE(lines[1].find("\"text:/data/a, \"\"quoted\"\" path.txt\""), std::string::npos) << lines[1];
  }
}

TEST(BenchWriters, JsonParsesAndHasTheFields) {
  const BenchReport r = fake_report(true);
  const nlohmann::json j = nlohmann::json::parse(to_json(r).dump());
  for (const char* k : {"schema", "model", "prompt", "build", "cpu", "hardware_threads", "measurement", "bandwidth", "rows"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_TRUE(j["build"].contains("git_commit"));
  EXPECT_FALSE(j["build"]["git_commit"].get<std::string>().empty());
  ASSERT_EQ(j["rows"].size(), r.rows.size());
  for (const auto& row : j["rows"]) {
    for (const char* k : {"model", "policy", "bits", "depth", "threads", "prefill_tok_per_s", "decode_ms_per_token",
                          "bytes_per_token", "achieved_gb_per_s", "kv_fast_bytes", "stall_ms_per_token", "copy_ms_per_token",
                          "peak_rss_bytes", "decode_act", "prefill_act", "prefill_attn", "git_commit", "cxx_flags", "cpu", "floor_ms", "floor_ratio"})
      EXPECT_TRUE(row.contains(k)) << k;
    for (const char* k : {"median", "p25", "p75", "min", "max"}) EXPECT_TRUE(row["decode_ms_per_token"].contains(k)) << k;
    for (const char* k : {"weights", "kv_fast", "kv_slow", "total"}) EXPECT_TRUE(row["bytes_per_token"].contains(k)) << k;
    EXPECT_GT(row["floor_ms"].get<double>(), 0);
  }
  EXPECT_EQ(j["rows"][1]["policy"], "full");
  EXPECT_EQ(j["rows"][3]["bits"], 2);
  // floor = bytes / bandwidth (20 GB/s).
  EXPECT_NEAR(j["rows"][0]["floor_ms"].get<double>(), r.rows[0].bytes.total() / 20e6, 1e-9);
  EXPECT_FALSE(to_json(fake_report(false)).contains("bandwidth"));
  // A row probed right after its own decode (BenchOptions::probe_bytes) keeps that figure.
  BenchReport own = fake_report(true);
  own.rows[1].bandwidth_gb_per_s = 40.0;
  apply_bandwidth(own);
  EXPECT_NEAR(own.rows[1].floor_ms, own.rows[1].bytes.total() / 40e6, 1e-9);
  EXPECT_NEAR(own.rows[0].floor_ms, own.rows[0].bytes.total() / 20e6, 1e-9);
  EXPECT_NE(to_table(own).find("probe"), std::string::npos);
}

TEST(BenchWriters, SvgHasOneLinePerPolicy) {
  const BenchReport r = fake_report(false);
  const std::string svg = to_svg(r);
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
  EXPECT_EQ(count(svg, "<polyline"), 2u);
  EXPECT_NE(svg.find("data-series=\"full\""), std::string::npos);
  EXPECT_NE(svg.find("data-series=\"specache:2\""), std::string::npos);
  EXPECT_EQ(count(svg, "<"), count(svg, ">"));  // no stray brackets from unescaped text
  EXPECT_EQ(count(svg, "<text"), count(svg, "</text>"));
  // Two thread counts: one line per (policy, threads).
  BenchReport r2 = r;
  for (BenchRow row : r.rows) {
    row.threads = 1;
    r2.rows.push_back(row);
  }
  EXPECT_EQ(count(to_svg(r2), "<polyline"), 4u);
  EXPECT_EQ(to_svg(BenchReport{}).rfind("<svg", 0), 0u);  // empty report still renders
}

TEST(BenchBandwidth, ProbeIsPlausible) {
  for (int threads : {1, 2}) {
    const BandwidthResult b = probe_read_bandwidth(8u << 20, threads, 3);
    EXPECT_TRUE(std::isfinite(b.best_gb_per_s));
    EXPECT_GT(b.best_gb_per_s, 0.1);
    EXPECT_LT(b.best_gb_per_s, 10000.0);
    EXPECT_GE(b.best_gb_per_s, b.median_gb_per_s);
    EXPECT_EQ(b.threads, threads);
    EXPECT_EQ(b.buffer_bytes, 8u << 20);
  }
  EXPECT_THROW(probe_read_bandwidth(16, 1, 1), Error);
}

TEST(BenchPrompt, TextIsRepeatedAndSyntheticCycles) {
  SKIP_IF_MISSING(stories_path());
  auto m = Model::load(stories_path());
  auto tok = Tokenizer::from_gguf(m->gguf());
  const PromptSource p = build_prompt_tokens(tok.get(), m->config().n_vocab, "Once upon a time.\n", "x.txt", 100);
  EXPECT_EQ(p.kind, "text");
  EXPECT_EQ(p.path, "x.txt");
  ASSERT_EQ(p.tokens.size(), 100u);
  EXPECT_EQ(build_prompt_tokens(tok.get(), m->config().n_vocab, "Once upon a time.\n", "x.txt", 100).tokens, p.tokens);
  const PromptSource s = build_prompt_tokens(nullptr, 10, "", "", 25);
  EXPECT_EQ(s.kind, "synthetic");
  ASSERT_EQ(s.tokens.size(), 25u);
  EXPECT_EQ(s.tokens[0], 0);
  EXPECT_EQ(s.tokens[12], 2);
}

// --interleave: per depth one session of every policy, a step of each in turn. Every policy
// gets its own row with the same sample counts as a plain run, the first policy's paired ratio
// is exactly 1 and the others' positive; CSV, JSON and the table carry the column. The outputs
// are those of separate sessions (interleaving changes no result): the kv bytes match a plain run's.
TEST(BenchRun, InterleavedRunsPairEveryStep) {
  SKIP_IF_MISSING(stories_path());
  auto m = Model::load(stories_path());
  auto tok = Tokenizer::from_gguf(m->gguf());
  BenchOptions opt;
  opt.model_path = stories_path();
  opt.policies = {parse_policy_spec("full"), parse_policy_spec("specache:1")};
  opt.kv.group = 32;
  opt.kv.topk = 8;
  opt.kv.window = 8;
  opt.depths = {48, 96};
  opt.threads = {2};
  opt.gen = 6;
  opt.reps = 2;
  const std::string text = "Lily went to the park. She saw a big dog.\n";
  BenchReport plain, inter;
  run_bench(*m, tok.get(), opt, text, "t.txt", plain);
  opt.interleave = true;
  opt.probe_bytes = 4u << 20;  // one probe after each depth, shared by its rows
  opt.probe_passes = 1;
  run_bench(*m, tok.get(), opt, text, "t.txt", inter);
  ASSERT_EQ(inter.rows.size(), 4u);
  EXPECT_TRUE(inter.interleaved);
  EXPECT_GT(inter.rows[0].bandwidth_gb_per_s, 0.0);
  EXPECT_EQ(inter.rows[0].bandwidth_gb_per_s, inter.rows[1].bandwidth_gb_per_s);
  EXPECT_GT(inter.rows[2].bandwidth_gb_per_s, 0.0);
  EXPECT_EQ(plain.rows[0].bandwidth_gb_per_s, 0.0);  // no probe asked for
  for (const BenchRow& row : inter.rows) {
    EXPECT_EQ(row.decode_samples, 2u * (6 - 2));
    if (row.policy == "full") EXPECT_EQ(row.paired_ratio, 1.0);
    else EXPECT_GT(row.paired_ratio, 0.0);
    // The same configuration measured alone (plain rows are policy-major, interleaved depth-major).
    const auto it = std::find_if(plain.rows.begin(), plain.rows.end(), [&](const BenchRow& p) {
      return p.policy_spec == row.policy_spec && p.depth == row.depth;
    });
    ASSERT_NE(it, plain.rows.end());
    EXPECT_EQ(it->paired_ratio, 0.0);
    EXPECT_EQ(row.bytes.kv_fast, it->bytes.kv_fast);
    EXPECT_EQ(row.kv_fast_bytes, it->kv_fast_bytes);
    EXPECT_EQ(row.kv_slow_bytes, it->kv_slow_bytes);
  }
  EXPECT_EQ(inter.rows[0].depth, 48);  // depth-major: both policies of a depth together
  EXPECT_EQ(inter.rows[1].depth, 48);
  const auto lines = lines_of(to_csv(inter));
  ASSERT_EQ(lines.size(), 5u);
  const auto fields = csv_split;
  const auto head = fields(lines[0]);
  const size_t col = std::find(head.begin(), head.end(), "paired_ratio") - head.begin();
  ASSERT_LT(col, head.size());
  EXPECT_EQ(fields(lines[1])[col], "1");
  EXPECT_GT(std::stod(fields(lines[2])[col]), 0.0);
  EXPECT_EQ(fields(lines_of(to_csv(plain))[1])[col], "");
  const nlohmann::json j = to_json(inter);
  EXPECT_TRUE(j["interleaved"].get<bool>());
  EXPECT_EQ(j["rows"][0]["paired_ratio"].get<double>(), 1.0);
  EXPECT_FALSE(to_json(plain)["rows"][0].contains("paired_ratio"));
  EXPECT_NE(to_table(inter).find("x first"), std::string::npos);
  EXPECT_EQ(to_table(plain).find("x first"), std::string::npos);
}

TEST(BenchRun, EndToEndOnStories260K) {
  SKIP_IF_MISSING(stories_path());
  auto m = Model::load(stories_path());
  auto tok = Tokenizer::from_gguf(m->gguf());
  BenchOptions opt;
  opt.model_path = stories_path();
  opt.policies = {parse_policy_spec("full")};
  opt.depths = {16, 64};
  opt.threads = {1, 2};
  opt.gen = 5;
  opt.reps = 2;
  opt.probe_bytes = 4u << 20;  // probed again after each row
  opt.probe_passes = 2;
  BenchReport r;
  r.bandwidth.push_back(probe_read_bandwidth(4u << 20, 1, 2));
  run_bench(*m, tok.get(), opt, "Lily went to the park. She saw a big dog.\n", "t.txt", r);
  ASSERT_EQ(r.rows.size(), 4u);
  EXPECT_NE(r.measurement.find("probed right after"), std::string::npos);
  EXPECT_EQ(r.prompt_kind, "text");
  const ModelConfig& mc = m->config();
  for (const BenchRow& row : r.rows) {
    EXPECT_EQ(row.policy, "full");
    EXPECT_EQ(row.decode_samples, 2u * (5 - 2));
    EXPECT_GT(row.decode_ms.median, 0);
    EXPECT_LE(row.decode_ms.min, row.decode_ms.median);
    EXPECT_GE(row.decode_ms.max, row.decode_ms.median);
    EXPECT_GT(row.prefill_tok_per_s, 0);
    EXPECT_EQ(row.bytes.weights, m->weight_bytes_per_token());
    EXPECT_EQ(row.bytes.kv_fast, (uint64_t)row.depth * mc.n_layer * mc.n_head_kv * mc.head_dim * 4);
    EXPECT_EQ(row.kv_fast_bytes, (uint64_t)(row.depth + 5) * mc.n_layer * mc.n_head_kv * mc.head_dim * 4);
    EXPECT_GT(row.peak_rss_bytes, 0u);
    EXPECT_GT(row.floor_ms, 0);
    // The model's phases over the measured steps: sub-intervals of each step, so their sum per
    // step never exceeds the step's mean time (the session's bookkeeping lies outside them).
    const DecodePhases& ph = row.phases_ms;
    EXPECT_EQ(ph.steps, (int64_t)row.decode_samples);
    for (double x : {ph.qkv_ms, ph.attend_ms, ph.wo_ms, ph.ffn_ms, ph.end_step_ms, ph.output_ms}) EXPECT_GE(x, 0.0);
    EXPECT_GT(ph.attend_ms, 0.0);
    EXPECT_GT(ph.total_ms(), 0.0);
    EXPECT_LE(ph.total_ms(), row.decode_ms.mean * (1 + 1e-9));
    // The floor comes from the row's own probe (a positive, plausible figure).
    EXPECT_GT(row.bandwidth_gb_per_s, 0.1);
    EXPECT_LT(row.bandwidth_gb_per_s, 10000.0);
    EXPECT_NEAR(row.floor_ms, row.bytes.total() / (row.bandwidth_gb_per_s * 1e6), 1e-9 * row.floor_ms);
  }
  const auto lines = lines_of(to_csv(r));
  EXPECT_EQ(lines.size(), 5u);
  EXPECT_EQ(count(to_svg(r), "<polyline"), 2u);  // full @1t, full @2t
  const nlohmann::json j = to_json(r);
  EXPECT_NEAR(j["rows"][0]["decode_phases_ms"]["attend"].get<double>(), r.rows[0].phases_ms.attend_ms, 1e-12);
  EXPECT_NE(to_table(r).find("where a decode step goes"), std::string::npos);
  {
    const auto head = csv_split(lines[0]);
    const size_t col = std::find(head.begin(), head.end(), "phase_attend_ms") - head.begin();
    ASSERT_LT(col, head.size());
    EXPECT_NEAR(std::stod(csv_split(lines[1])[col]), r.rows[0].phases_ms.attend_ms, 1e-6 * (1 + r.rows[0].phases_ms.attend_ms));
  }

  // A probe after a row that cannot allocate its buffer costs the row its time-local floor, not
  // the run: the row keeps the initial probe's.
  opt.probe_bytes = (size_t)1 << 52;
  opt.depths = {16};
  opt.threads = {1};
  BenchReport r2;
  r2.bandwidth.push_back(BandwidthResult{1, 4u << 20, 2, 12.5, 12.0});
  std::vector<std::string> logged;
  run_bench(*m, tok.get(), opt, "Lily went to the park.\n", "t.txt", r2,
            [&](const std::string& line) { logged.push_back(line); });
  ASSERT_EQ(r2.rows.size(), 1u);
  EXPECT_EQ(r2.rows[0].bandwidth_gb_per_s, 12.5);
  EXPECT_NEAR(r2.rows[0].floor_ms, r2.rows[0].bytes.total() / 12.5e6, 1e-9);
  EXPECT_TRUE(std::any_of(logged.begin(), logged.end(),
                          [](const std::string& l) { return l.find("probe after the row failed") != std::string::npos; }));
}

// --batch: B sessions per row decode together. The weights are counted once per step and every
// sequence's KV B times; a batch-1 row is the unbatched measurement; rows keep the given order;
// policies without a 16-bit copy to hand on (kivi, streaming) are batched too.
TEST(BenchRun, BatchedRowsCountTheWeightsOnceAndEveryCache) {
  SKIP_IF_MISSING(stories_path());
  auto m = Model::load(stories_path());
  auto tok = Tokenizer::from_gguf(m->gguf());
  const ModelConfig& mc = m->config();
  BenchOptions opt;
  opt.model_path = stories_path();
  opt.policies = {parse_policy_spec("full"), parse_policy_spec("specache:1"), parse_policy_spec("kivi:2")};
  opt.kv.group = 32;
  opt.kv.topk = 8;
  opt.kv.window = 8;
  opt.depths = {64};
  opt.threads = {2};
  opt.batches = {3, 1};
  opt.gen = 6;
  BenchReport r;
  run_bench(*m, tok.get(), opt, "Lily went to the park. She saw a big dog.\n", "t.txt", r);
  ASSERT_EQ(r.rows.size(), 6u);
  EXPECT_NE(r.measurement.find("batch B > 1"), std::string::npos);
  for (size_t p = 0; p < 3; ++p) {
    const BenchRow& b3 = r.rows[2 * p];
    const BenchRow& b1 = r.rows[2 * p + 1];
    SCOPED_TRACE(b3.policy_spec);
    EXPECT_EQ(b3.batch, 3);
    EXPECT_EQ(b1.batch, 1);
    EXPECT_EQ(b3.policy_spec, b1.policy_spec);
    EXPECT_EQ(b3.decode_samples, 6u - 2);
    EXPECT_EQ(b3.bytes.weights, m->weight_bytes_per_token());  // once per step, not per sequence
    EXPECT_EQ(b3.bytes.kv_fast, 3 * b1.bytes.kv_fast);
    EXPECT_EQ(b3.kv_fast_bytes, 3 * b1.kv_fast_bytes);
    EXPECT_EQ(b3.kv_slow_bytes, 3 * b1.kv_slow_bytes);
    EXPECT_NEAR(b3.batch_tok_per_s, 3000.0 / b3.decode_ms.median, 1e-9 * b3.batch_tok_per_s);
    EXPECT_NEAR(b1.batch_tok_per_s, 1000.0 / b1.decode_ms.median, 1e-9 * b1.batch_tok_per_s);
    EXPECT_EQ(b3.phases_ms.steps, (int64_t)b3.decode_samples);
    EXPECT_GT(b3.phases_ms.attend_ms, 0.0);
  }
  EXPECT_EQ(r.rows[0].bytes.kv_fast, 3ull * 64 * mc.n_layer * mc.n_head_kv * mc.head_dim * 4);
  const auto lines = lines_of(to_csv(r));
  const auto head = csv_split(lines[0]);
  const size_t col = std::find(head.begin(), head.end(), "batch") - head.begin();
  ASSERT_LT(col, head.size());
  EXPECT_EQ(csv_split(lines[1])[col], "3");
  EXPECT_EQ(csv_split(lines[2])[col], "1");
  const nlohmann::json j = to_json(r);
  EXPECT_EQ(j["rows"][0]["batch"].get<int>(), 3);
  EXPECT_GT(j["rows"][0]["batch_tok_per_s"].get<double>(), 0.0);
  EXPECT_NE(to_table(r).find("full x3"), std::string::npos);
  EXPECT_EQ(count(to_svg(r), "<polyline"), 6u);  // one series per policy and batch size

  // --batch-share: the later sequences read the first one's cache of the prompt. The bytes each
  // step reads are the same (every sequence still attends over the whole prompt); the bytes held
  // are one cache and the others' own parts. kivi cannot share: it copies, and says so.
  opt.batch_share = true;
  opt.batches = {3};
  opt.depths = {200};
  BenchReport sh;
  run_bench(*m, tok.get(), opt, "Lily went to the park. She saw a big dog.\n", "t.txt", sh);
  opt.batch_share = false;
  BenchReport cp;
  run_bench(*m, tok.get(), opt, "Lily went to the park. She saw a big dog.\n", "t.txt", cp);
  ASSERT_EQ(sh.rows.size(), 3u);
  for (size_t p = 0; p < 3; ++p) {
    SCOPED_TRACE(sh.rows[p].policy_spec);
    const bool can = sh.rows[p].policy != "kivi";
    EXPECT_EQ(sh.rows[p].batch_share, can);
    EXPECT_FALSE(cp.rows[p].batch_share);
    EXPECT_EQ(sh.rows[p].bytes.kv_fast, cp.rows[p].bytes.kv_fast);
    if (can) EXPECT_LT(sh.rows[p].kv_fast_bytes, cp.rows[p].kv_fast_bytes);
    else EXPECT_EQ(sh.rows[p].kv_fast_bytes, cp.rows[p].kv_fast_bytes);
  }
  // full: the first sequence holds all n = depth + gen positions, the others the part after the
  // shared key tiles (all but their own last 32 prompt tokens, rounded down to 16), against three
  // copies of n.
  const uint64_t n = 200 + 6, tail = n - (200 - 32) / 16 * 16;
  EXPECT_EQ(sh.rows[0].kv_fast_bytes * 3 * n, cp.rows[0].kv_fast_bytes * (n + 2 * tail));
  EXPECT_NE(to_table(sh).find("full x3s"), std::string::npos);
  EXPECT_NE(sh.measurement.find("N questions about one document"), std::string::npos);
  EXPECT_TRUE(to_json(sh)["rows"][0]["batch_share"].get<bool>());
  opt.batches = {1};
  opt.batch_share = true;
  BenchReport one;
  EXPECT_THROW(run_bench(*m, tok.get(), opt, "x\n", "t.txt", one), Error);  // batch_share without a batch
  opt.batch_share = false;
  opt.batches = {3, 1};
  opt.depths = {64};

  opt.interleave = true;  // one sequence per policy by design
  BenchReport bad;
  EXPECT_THROW(run_bench(*m, tok.get(), opt, "x\n", "t.txt", bad), Error);
  opt.interleave = false;
  opt.batches = {0};
  EXPECT_THROW(run_bench(*m, tok.get(), opt, "x\n", "t.txt", bad), Error);
}
