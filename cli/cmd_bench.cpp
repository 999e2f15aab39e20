// specache bench: decode speed over KV policies x context depths x thread counts, with bytes per
// token per memory tier and (--bandwidth) the memory-bandwidth floor. See docs/BENCHMARKS.md.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <set>

#include "bench/bench.h"
#include "common.h"
#include "engine/tokenizer.h"
#include "model/model.h"
#include "util/error.h"
#include "util/text_out.h"

namespace spc::cli {

namespace {

struct BenchArgs {
  std::string model;
  std::string policies = "full";
  std::string depths = "512,2048,8192";
  std::string threads;
  std::string batch = "1";
  bool batch_share = false;
  int reps = 1;
  int gen = 16;
  int warmup = 2;
  std::string prompt_file;
  bool synthetic = false;
  bool interleave = false;
  std::string csv, json, svg;
  bool bandwidth = false;
  int bandwidth_mib = 1024;
  int bandwidth_passes = 5;
  KvConfig kv;
  ActArgs act;
};

std::string default_text_path() {
  // ../shared beside the project root, found from the working directory (repository root or build/).
  for (const char* p : {"../shared/data/gutenberg/pg2600-war-and-peace.txt",
                        "../../shared/data/gutenberg/pg2600-war-and-peace.txt"})
    if (std::filesystem::exists(p)) return std::filesystem::weakly_canonical(p).string();
  return "";
}

int run_bench_cmd(const CLI::App& app, BenchArgs& a) {
  auto log = [](const std::string& s) { std::fprintf(stderr, "bench: %s\n", s.c_str()); };
  SPC_CHECK(app.count("--kv") == 0, "bench takes its policies from --policies name[:bits],..., not --kv");
  bench::BenchOptions opt;
  opt.model_path = a.model;
  opt.kv = a.kv;
  opt.policies = bench::parse_policy_list(a.policies);
  bench::validate_policy_specs(opt.policies, a.kv);
  opt.depths = bench::parse_int_list(a.depths, "--depths");
  if (a.threads.empty()) {
    opt.threads = {resolve_threads(0)};
  } else {
    for (int64_t t : bench::parse_int_list(a.threads, "-t/--threads")) {
      SPC_CHECK(t <= 1024, "-t/--threads: %lld threads is too many", (long long)t);
      warn_oversubscribed((int)t);
      opt.threads.push_back((int)t);
    }
  }
  opt.batches.clear();
  for (int64_t b : bench::parse_int_list(a.batch, "--batch")) opt.batches.push_back((int)std::min<int64_t>(b, 1 << 30));
  opt.reps = a.reps;
  opt.gen = a.gen;
  opt.warmup = a.warmup;
  opt.interleave = a.interleave;
  opt.batch_share = a.batch_share;
  bench::validate_batches(opt);
  if (a.bandwidth) {  // probed again right after each row (each depth when interleaved): its floor
    opt.probe_bytes = (size_t)a.bandwidth_mib << 20;
    opt.probe_passes = a.bandwidth_passes;
  }
  SPC_CHECK(!(a.synthetic && !a.prompt_file.empty()), "give either --prompt-file or --synthetic, not both");

  std::string text_path = a.synthetic ? "" : a.prompt_file.empty() ? default_text_path() : a.prompt_file;
  const std::string text = text_path.empty() ? "" : read_text_file(text_path);

  auto model = Model::load(a.model);
  apply_act(a.act, *model);
  const ModelConfig& mc = model->config();
  std::unique_ptr<Tokenizer> tok;
  try {
    tok = Tokenizer::from_gguf(model->gguf());
  } catch (const Error& e) {
    log(strfmt("no usable tokenizer (%s): synthetic prompt", e.what()));
  }
  for (int64_t d : opt.depths)
    if (d + a.gen > mc.n_ctx_train)
      log(strfmt("depth %lld + %d generated exceeds the model's trained context %lld (timing is still meaningful)",
                 (long long)d, a.gen, (long long)mc.n_ctx_train));

  bench::BenchReport report;
  if (a.bandwidth) {
    std::set<int> counts(opt.threads.begin(), opt.threads.end());
    counts.insert(1);
    for (int t : counts) {
      report.bandwidth.push_back(bench::probe_read_bandwidth((size_t)a.bandwidth_mib << 20, t, a.bandwidth_passes));
      const auto& b = report.bandwidth.back();
      std::printf("memory read bandwidth, %d thread(s), %d MiB buffer: best %.2f GB/s, median %.2f GB/s (%d passes)\n",
                  t, a.bandwidth_mib, b.best_gb_per_s, b.median_gb_per_s, b.passes);
      std::fflush(stdout);
    }
  }
  bench::run_bench(*model, tok.get(), opt, text, text_path, report, log);

  const auto& b = report.build;
  std::printf("model %s; prompt %s%s%s; matmul activations: decode %s, prefill %s; prefill attention %s\n",
              a.model.c_str(), report.prompt_kind.c_str(), report.prompt_path.empty() ? "" : " from ",
              report.prompt_path.c_str(), report.decode_act.c_str(), report.prefill_act.c_str(),
              report.prefill_attn.c_str());
  std::printf("build %s %s (%s; %s); cpu %s, %d hardware threads\n", b.git_commit.c_str(), b.build_type.c_str(),
              b.compiler.c_str(), b.cxx_flags.c_str(), report.cpu.c_str(), report.hardware_threads);
  std::printf("%s\n\n", report.measurement.c_str());
  std::fputs(bench::to_table(report).c_str(), stdout);
  if (!a.csv.empty()) write_text_file(a.csv, bench::to_csv(report));
  if (!a.json.empty())
    write_text_file(a.json,
                    bench::to_json(report).dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
  if (!a.svg.empty()) write_text_file(a.svg, bench::to_svg(report));
  return 0;
}

}  // namespace

Runner add_bench(CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  CLI::App* sub = app.add_subcommand("bench", "measure prefill and decode speed across KV policies, depths and threads");
  sub->add_option("-m,--model", a->model, "GGUF model file")->required();
  add_act_flags(*sub, a->act);
  sub->add_option("--policies", a->policies,
                  "comma-separated policy specs name[:bits], e.g. full,specache:1,kivi:2 (other knobs from --kv-*)")
      ->capture_default_str();
  sub->add_option("--depths", a->depths, "comma-separated prompt lengths in tokens")->capture_default_str();
  sub->add_option("-t,--threads", a->threads, "comma-separated thread counts (default: all hardware threads)");
  sub->add_option("--batch", a->batch,
                  "comma-separated batch sizes: B sequences of each policy (each with its own KV cache of the same "
                  "prompt) decoded together, one row per size; rows with B > 1 give ms per step and tok/s of the "
                  "whole batch")
      ->capture_default_str();
  sub->add_flag("--batch-share", a->batch_share,
                "batched rows: the sequences share one cache of the prompt (N questions about one document, which "
                "is held once) instead of each holding a copy; policies that cannot share (kivi, streaming) copy");
  sub->add_option("--reps", a->reps, "fresh sessions (prefill + decode) per configuration")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  sub->add_option("--gen", a->gen, "tokens decoded per session")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  sub->add_option("--warmup", a->warmup, "leading decode steps per session left out of the statistics")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  sub->add_flag("--interleave", a->interleave,
                "per depth, one session of every policy decoding a step of each in turn, so slow spells of a shared "
                "machine hit all policies alike; adds paired_ratio (median per-step time over the first policy's)");
  sub->add_option("--prompt-file", a->prompt_file,
                  "text to tokenize for the prompt, repeated as needed (default: ../shared/data/gutenberg/"
                  "pg2600-war-and-peace.txt when present, else synthetic ids)");
  sub->add_flag("--synthetic", a->synthetic, "synthetic prompt: token ids cycling through the vocabulary");
  sub->add_option("--csv", a->csv, "write the rows as CSV");
  sub->add_option("--json", a->json, "write the report as JSON");
  sub->add_option("--svg", a->svg, "write a plot of decode ms/token vs depth (one line per policy) as SVG");
  sub->add_flag("--bandwidth", a->bandwidth,
                "probe memory read bandwidth at the start and again right after each row's decode steps (after "
                "each depth's with --interleave), and report each row's floor against the probe right after it");
  sub->add_option("--bandwidth-mib", a->bandwidth_mib, "bandwidth probe buffer size in MiB")
      ->check(CLI::Range(1, 1 << 16))
      ->capture_default_str();
  sub->add_option("--bandwidth-passes", a->bandwidth_passes, "bandwidth probe passes (best is reported)")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  add_kv_flags(*sub, a->kv);
  sub->get_option("--kv")->description("not used by bench: give --policies");
  return [sub, a] { return run_bench_cmd(*sub, *a); };
}

}  // namespace spc::cli
