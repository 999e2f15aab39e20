// specache eval: passkey / needle-in-a-haystack / perplexity / agreement of the KV policies
// over context length x depth; prefill once per case, decode under every policy.
#include <cstdio>
#include <fstream>
#include <memory>

#include "common.h"
#include "engine/chat.h"
#include "engine/tokenizer.h"
#include "eval/eval.h"
#include "model/model.h"
#include "util/error.h"
#include "util/text_out.h"
#include "util/threadpool.h"

namespace spc::cli {

namespace {

struct EvalArgs {
  ModelArgs m;
  std::string tasks = "passkey,niah,ppl,agree";
  std::string policies = "full,kivi:1,kivi:2,specache:1,specache:2,specache-refetch:1,specache-exact:1,streaming,topk-oracle:1";
  std::vector<int64_t> lengths = {1024, 2048, 4096, 8192};
  std::vector<double> depths = {0, 0.25, 0.5, 0.75, 1};
  std::vector<uint64_t> seeds = {1};
  std::string haystack = "../shared/data/gutenberg/pg2600-war-and-peace.txt";
  std::string chat = "auto";
  eval::NiahOptions niah;
  int gen = 16, ppl_tokens = 256, agree_tokens = 64;
  std::string csv, json, heatmap_dir;
  std::vector<std::string> merge;
  bool quiet = false;
  bool no_share_prefix = false;
  KvConfig kv;
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t a = 0;
  while (a <= s.size()) {
    size_t b = s.find(',', a);
    if (b == std::string::npos) b = s.size();
    if (b > a) out.push_back(s.substr(a, b - a));
    a = b + 1;
  }
  return out;
}

// --merge: reports over the cases of earlier --json outputs (runs of different lengths), no model run.
int run_merge(EvalArgs& a) {
  std::vector<eval::CaseResult> all;
  for (const auto& f : a.merge) {
    auto r = eval::results_from_json(read_text_file(f));
    for (auto& c : r)  // re-score from the stored outputs with the current rule
      if (c.task == "passkey" || c.task == "niah") c.score = eval::score_contains(c.output, c.answer) ? 1 : 0;
    all.insert(all.end(), r.begin(), r.end());
  }
  eval::EvalOptions o;
  o.policies.clear();
  o.tasks.clear();
  o.ppl_tokens = a.ppl_tokens, o.agree_tokens = a.agree_tokens;
  if (!a.csv.empty()) write_text_file(a.csv, eval::csv_report(all));
  if (!a.json.empty()) write_text_file(a.json, eval::json_report(all, o));
  if (!a.heatmap_dir.empty())
    for (const auto& p : eval::write_heatmaps(all, a.heatmap_dir)) std::fprintf(stderr, "eval: wrote %s\n", p.c_str());
  std::fputs(eval::markdown_report(all, o).c_str(), stdout);
  return 0;
}

int run_eval_cmd(const CLI::App& app, EvalArgs& a) {
  SPC_CHECK(app.count("--kv") == 0, "eval takes --policies, not --kv");
  if (!a.merge.empty()) return run_merge(a);
  SPC_CHECK(!a.m.model.empty(), "eval needs -m/--model (unless --merge)");
  eval::EvalOptions o;
  o.tasks = split(a.tasks);
  o.policies = eval::parse_policies(a.policies, a.kv);
  o.lengths = a.lengths;
  o.depths = a.depths;
  for (double d : o.depths) SPC_CHECK(d >= 0 && d <= 1, "--depths must lie in [0, 1]");
  o.seeds = a.seeds;
  SPC_CHECK(!o.seeds.empty(), "--seeds is empty");
  for (size_t i = 0; i < o.seeds.size(); ++i)
    for (size_t j = 0; j < i; ++j) SPC_CHECK(o.seeds[i] != o.seeds[j], "--seeds: %llu listed twice", (unsigned long long)o.seeds[i]);
  o.gen = a.gen, o.ppl_tokens = a.ppl_tokens, o.agree_tokens = a.agree_tokens;
  o.verbose = !a.quiet;
  o.share_prefix = !a.no_share_prefix;
  // The inputs that can be wrong, before the model loads.
  eval::check_tasks(o.tasks);
  bool need_text = false;
  for (const auto& t : o.tasks) need_text |= t != "passkey";
  std::string text;
  if (need_text) {
    SPC_CHECK(std::ifstream(a.haystack).good(),
              "--haystack %s: cannot open it (niah, ppl and agree read a long plain text; a relative path is taken "
              "from the working directory, and the default is the checkout's ../shared copy of War and Peace)",
              a.haystack.c_str());
    text = read_text_file(a.haystack);
  }

  auto model = Model::load(a.m.model);
  const ActChoice act = apply_act(a.m.act, *model);
  std::fprintf(stderr, "eval: matmul activations: decode %s, prefill %s; prefill attention %s\n", act.decode.c_str(),
               act.prefill.c_str(), act.prefill_attn.c_str());
  auto tok = Tokenizer::from_gguf(model->gguf());
  const ModelConfig& mc = model->config();
  for (int64_t L : o.lengths) {
    SPC_CHECK(L >= 64, "--lengths: %lld is too short", (long long)L);
    if (L > mc.n_ctx_train)
      std::fprintf(stderr, "specache: warning: length %lld exceeds the model's trained context %lld\n", (long long)L,
                   (long long)mc.n_ctx_train);
  }
  if (need_text) o.haystack = eval::gutenberg_body(text);

  o.niah = a.niah;
  const auto tmpl = model->gguf().get_string("tokenizer.chat_template");
  bool chat = false;
  if (a.chat == "on") {
    SPC_CHECK(tmpl.has_value(), "%s: --chat on needs a chat template, but the model has none", a.m.model.c_str());
    chat = true;
  } else if (a.chat == "auto" && tmpl.has_value()) {
    try {
      chat = detect_chat_family(*tmpl) == ChatFamily::ChatML;
    } catch (const Error&) {
      chat = false;
    }
  }
  if (chat) o.niah.chat_template = *tmpl;
  std::fprintf(stderr, "eval: niah prompts %s the chat template\n", chat ? "use" : "do not use");

  ThreadPool pool(resolve_threads(a.m.threads));
  std::vector<eval::CaseResult> partial;
  auto flush = [&](const std::vector<eval::CaseResult>& r) {
    if (!a.csv.empty()) write_text_file(a.csv, eval::csv_report(r));
    if (!a.json.empty()) write_text_file(a.json, eval::json_report(r, o));
  };
  const auto results = eval::run_eval(*model, *tok, pool, o, [&](const eval::CaseResult& c) {
    partial.push_back(c);
    flush(partial);  // long runs leave usable partial output
  });
  flush(results);
  if (!a.heatmap_dir.empty())
    for (const auto& p : eval::write_heatmaps(results, a.heatmap_dir)) std::fprintf(stderr, "eval: wrote %s\n", p.c_str());
  std::fputs(eval::markdown_report(results, o).c_str(), stdout);
  return 0;
}

}  // namespace

Runner add_eval(CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  CLI::App* sub = app.add_subcommand("eval", "quality of the KV policies: passkey, needle in a haystack, perplexity, agreement");
  add_model_flags(*sub, a->m);
  add_act_flags(*sub, a->m.act);
  sub->get_option("--model")->required(false);  // not needed with --merge; checked in run_eval_cmd
  sub->add_option("--tasks", a->tasks, "comma-separated: passkey, niah, ppl, agree")->capture_default_str();
  sub->add_option("--policies", a->policies, "comma-separated policy[:bits] list")->capture_default_str();
  sub->add_option("--lengths", a->lengths, "context lengths in tokens")->delimiter(',')->capture_default_str();
  sub->add_option("--depths", a->depths, "needle depths (fractions of the context)")->delimiter(',')->capture_default_str();
  sub->add_option("--seed,--seeds", a->seeds,
                  "seeds of the pass keys and needle answers (several: one case per seed, length and depth)")
      ->delimiter(',')
      ->capture_default_str();
  sub->add_option("--haystack", a->haystack, "text for niah, ppl and agree (Gutenberg header skipped)")->capture_default_str();
  sub->add_option("--needle", a->niah.needle, "needle sentence; {N} is replaced by the answer")->capture_default_str();
  sub->add_option("--question", a->niah.question, "niah question")->capture_default_str();
  sub->add_option("--answer-prefix", a->niah.answer_prefix, "text the answer continues")->capture_default_str();
  sub->add_option("--chat", a->chat, "wrap niah prompts in the chat template: auto (ChatML models), on, off")
      ->check(CLI::IsMember({"auto", "on", "off"}))->capture_default_str();
  sub->add_option("--gen", a->gen, "tokens generated for passkey / niah")->check(CLI::Range(1, 4096))->capture_default_str();
  sub->add_option("--ppl-tokens", a->ppl_tokens, "tokens scored for perplexity")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  sub->add_option("--agree-tokens", a->agree_tokens, "tokens of the agreement runs")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  sub->add_option("--csv", a->csv, "write every case as CSV");
  sub->add_option("--json", a->json, "write every case as JSON");
  sub->add_option("--heatmap-dir", a->heatmap_dir, "write one SVG heat map per policy for passkey and niah");
  sub->add_option("--merge", a->merge, "no run: merge the cases of earlier --json files into one report")->delimiter(',');
  sub->add_flag("--no-share-prefix", a->no_share_prefix,
                "prefill every passkey/niah case whole (by default a case takes over the prompt prefix it shares "
                "with the previous case; the results are the same)");
  sub->add_flag("-q,--quiet", a->quiet, "no progress lines");
  add_kv_flags(*sub, a->kv);
  return [sub, a] { return run_eval_cmd(*sub, *a); };
}

}  // namespace spc::cli
