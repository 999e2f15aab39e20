// specache generate: prompt -> text, streaming, or one JSON object with --json.
#include <cstdio>
#include <memory>
#include <optional>
#include <nlohmann/json.hpp>

#include "bench/bench.h"
#include "common.h"
#include "engine/chat.h"
#include "engine/generate.h"
#include "engine/session.h"
#include "engine/tokenizer.h"
#include "kv/kv_policy.h"
#include "model/model.h"
#include "tier/rss.h"
#include "util/clock.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace spc::cli {

namespace {

struct GenerateArgs {
  ModelArgs m;
  std::vector<std::string> prompts, prompt_files;  // one each, or several of one kind: a batch
  int n_predict = 128;
  int64_t n_ctx = 0;
  float temp = 0, top_p = 0.95f, min_p = 0.05f;
  int top_k = 40;
  uint64_t seed = 0;
  bool chat = false, ignore_eos = false, json = false;
  bool no_kv_share = false;  // a batch's shared prompt beginning: copy its cache instead of sharing it
  KvConfig kv;
};

// Flags that only mean something for some policies: reject combinations that would be silently ignored.
void check_kv_combination(const CLI::App& app, const KvConfig& kv) {
  auto given = [&](const char* flag) { return app.count(flag) > 0; };
  const bool speculative = kv.policy == "specache" || kv.policy == "specache-refetch";
  const bool lowbit = kv_policy_has_lowbit_copy(kv.policy);
  const bool tiered = speculative || kv.policy == "specache-exact";
  if (!lowbit)
    for (const char* f : {"--kv-bits", "--kv-group", "--kv-debias"})
      SPC_CHECK(!given(f), "%s has no effect with --kv %s (it applies to kivi, specache, specache-refetch, specache-exact, topk-oracle)", f, kv.policy.c_str());
  if (!lowbit && kv.policy != "streaming")
    SPC_CHECK(!given("--kv-window"), "--kv-window has no effect with --kv %s", kv.policy.c_str());
  if (!tiered && kv.policy != "topk-oracle")
    SPC_CHECK(!given("--kv-topk"), "--kv-topk has no effect with --kv %s", kv.policy.c_str());
  if (!tiered)
    for (const char* f : {"--kv-store", "--kv-dir"})
      SPC_CHECK(!given(f), "%s has no effect with --kv %s (only specache, specache-refetch and specache-exact have a slow tier)", f, kv.policy.c_str());
  if (!speculative)
    for (const char* f : {"--kv-shift", "--kv-guess", "--kv-predecode", "--kv-copy"})
      SPC_CHECK(!given(f), "%s has no effect with --kv %s (it steers specache's speculative row)", f, kv.policy.c_str());
  if (kv.store == "file") SPC_CHECK(!kv.dir.empty(), "--kv-store file needs --kv-dir DIR");
  if (kv.store == "host") SPC_CHECK(kv.dir.empty(), "--kv-dir is only used with --kv-store file");
}

// The --json "kv" object of one session.
nlohmann::json kv_json(const Session& session, const std::string& policy) {
  const KvStats ks = session.kv().stats();
  nlohmann::json kv = {{"policy", ks.policy}, {"fast_bytes", ks.fast_bytes}, {"slow_bytes", ks.slow_bytes}};
  if (ks.shared_bytes) kv["shared_bytes"] = ks.shared_bytes;
  if (policy != "full") {
    kv["fetched_bytes_per_step"] = ks.fetched_bytes_per_step;
    kv["prefetch_reuse_rate"] = ks.prefetch_reuse_rate;
    kv["spec_recall"] = ks.spec_recall;
    kv["spec_recall_per_layer"] = ks.spec_recall_per_layer;
    kv["selection_read_share"] = ks.selection_read_share;
    if (session.guesses().checked) kv["guess_hit_rate"] = session.guesses().hit_rate();
    if (policy == "specache-refetch") kv["refetch_steps"] = ks.refetch_steps;
    if (ks.exact_mass_served >= 0) kv["exact_mass_served"] = ks.exact_mass_served;
    kv["stall_ms"] = ks.stall_ms;
    kv["copy_ms"] = ks.copy_ms;
  }
  return kv;
}

// Several prompts: one session each, prefilled one after the other, then generated together
// (generate_batch: one batched decode step for all of them at a time).
int run_generate_batch(const GenerateArgs& a, const Model& model, const Tokenizer& tok, const ActChoice& act,
                       const std::vector<std::string>& labels, const std::vector<std::vector<int32_t>>& prompts,
                       int64_t n_ctx, const GenerateOptions& go) {
  ThreadPool pool(resolve_threads(a.m.threads));
  std::vector<std::unique_ptr<Session>> sessions;
  std::vector<Session*> ptrs;
  int64_t prompt_tokens = 0;
  for (const auto& p : prompts) {
    sessions.push_back(std::make_unique<Session>(model, make_kv_policy(a.kv, model.kv_geometry(n_ctx)), pool));
    ptrs.push_back(sessions.back().get());
    prompt_tokens += (int64_t)p.size();
  }
  // Prompts that begin alike (questions about one document) prefill the shared part once.
  const double tp = now_ms();
  const int64_t shared = prefill_sharing_prefixes(ptrs, prompts, 64, !a.no_kv_share);
  const double prefill_ms = now_ms() - tp;
  const int64_t prefill_tokens = prompt_tokens - shared;
  const double t0 = now_ms();
  const std::vector<GenerateResult> res = generate_batch(ptrs, tok, go);
  const double decode_ms = now_ms() - t0;
  int64_t decoded = 0;
  uint64_t fast = 0, slow = 0, viewed = 0;
  for (const auto& s : sessions) {
    const KvStats ks = s->kv().stats();
    decoded += s->timings().decode_tokens;
    fast += ks.fast_bytes;
    slow += ks.slow_bytes;
    viewed += ks.shared_bytes;
  }
  const double tok_per_s = decode_ms > 0 ? decoded * 1000.0 / decode_ms : 0;
  const double prefill_tps = prefill_ms > 0 ? prefill_tokens * 1000.0 / prefill_ms : 0;
  if (a.json) {
    nlohmann::json results = nlohmann::json::array();
    for (size_t i = 0; i < sessions.size(); ++i) {
      const SessionTimings& t = sessions[i]->timings();
      results.push_back({{"source", labels[i]},
                         {"prompt_tokens", prompts[i]},
                         {"tokens", res[i].tokens},
                         {"text", res[i].text},
                         {"stopped_at_eos", res[i].stopped_at_eos},
                         {"stopped_at_context", res[i].stopped_at_context},
                         {"prefill_ms", t.prefill_ms},
                         {"decode_ms_per_token", t.decode_tokens ? t.decode_ms / t.decode_tokens : 0.0},
                         {"kv", kv_json(*sessions[i], a.kv.policy)}});
    }
    nlohmann::json j;
    j["batch"] = sessions.size();
    j["results"] = results;
    j["timings"] = {{"prefill_ms", prefill_ms},
                    {"prefill_tokens", prefill_tokens},
                    {"prefill_shared_tokens", shared},
                    {"prefill_tok_per_s", prefill_tps},
                    {"decode_ms", decode_ms},
                    {"decode_tokens", decoded},
                    {"decode_tok_per_s", tok_per_s},
                    {"decode_act", act.decode},
                    {"prefill_act", act.prefill},
                    {"prefill_attn", act.prefill_attn}};
    j["kv"] = {{"policy", a.kv.policy}, {"fast_bytes", fast}, {"slow_bytes", slow}, {"shared_bytes", viewed}};
    j["memory"] = {{"peak_rss_bytes", peak_rss_bytes()}};
    std::puts(j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    return 0;
  }
  for (size_t i = 0; i < sessions.size(); ++i) {
    std::printf("=== %zu/%zu: %s ===\n%s\n", i + 1, sessions.size(), labels[i].c_str(), res[i].text.c_str());
    if (res[i].stopped_at_context)
      std::printf("(stopped at the end of the context, %lld tokens)\n", (long long)n_ctx);
  }
  std::fflush(stdout);
  std::fprintf(stderr,
               "\nspecache: %zu sequences decoded together; prompts %lld tokens in all (%lld taken over from an earlier "
               "prompt's shared beginning), prefill %.1f ms (%.1f tok/s); "
               "%lld tokens decoded in %.1f ms (%.1f tok/s over the batch); KV %s: fast %.2f MiB, slow %.2f MiB in all "
               "(%.2f MiB more of fast KV read through shared prefixes); peak RSS %.1f MiB\n",
               sessions.size(), (long long)prompt_tokens, (long long)shared, prefill_ms, prefill_tps, (long long)decoded, decode_ms,
               tok_per_s, a.kv.policy.c_str(), fast / 1048576.0, slow / 1048576.0, viewed / 1048576.0,
               peak_rss_bytes() / 1048576.0);
  return 0;
}

int run_generate(const CLI::App& app, GenerateArgs& a) {
  SPC_CHECK(!(app.count("--prompt") && app.count("--file")), "give either -p/--prompt or -f/--file, not both");
  check_kv_combination(app, a.kv);
  // Several -p or -f: a batch of sequences generated together.
  std::vector<std::string> texts, labels;
  if (!a.prompt_files.empty()) {
    for (const std::string& f : a.prompt_files) texts.push_back(read_text_file(f)), labels.push_back(f);
  } else {
    for (size_t i = 0; i < a.prompts.size(); ++i) texts.push_back(a.prompts[i]), labels.push_back(strfmt("prompt %zu", i + 1));
  }
  if (texts.empty()) texts.emplace_back(), labels.emplace_back("prompt 1");
  SPC_CHECK(texts.size() <= 256, "%zu prompts: at most 256 sequences decode together", texts.size());
  auto model = Model::load(a.m.model);
  const ActChoice act = apply_act(a.m.act, *model);
  const ModelConfig& mc = model->config();
  auto tok = Tokenizer::from_gguf(model->gguf());
  SPC_CHECK(tok->n_vocab() == mc.n_vocab, "%s: tokenizer has %d tokens but the embedding has %d rows",
            a.m.model.c_str(), tok->n_vocab(), mc.n_vocab);
  std::optional<std::string> tmpl;
  if (a.chat) {
    tmpl = model->gguf().get_string("tokenizer.chat_template");
    SPC_CHECK(tmpl.has_value(), "%s: --chat needs a chat template, but the model has none", a.m.model.c_str());
  }
  std::vector<std::vector<int32_t>> prompts;
  for (std::string& text : texts) {
    if (tmpl) text = apply_chat_template(*tmpl, text);
    prompts.push_back(tok->encode(text, tok->add_bos_default(), true));
    if (prompts.back().empty()) {
      SPC_CHECK(tok->bos_id() >= 0, "empty prompt and the vocabulary has no BOS token to start from");
      prompts.back().push_back(tok->bos_id());
    }
  }
  const int64_t n_ctx = a.n_ctx > 0 ? a.n_ctx : mc.n_ctx_train;
  if (n_ctx > mc.n_ctx_train)
    std::fprintf(stderr, "specache: warning: context %lld exceeds the model's trained context %lld; quality may degrade\n",
                 (long long)n_ctx, (long long)mc.n_ctx_train);
  for (size_t i = 0; i < prompts.size(); ++i)
    SPC_CHECK((int64_t)prompts[i].size() <= n_ctx, "%s%s has %zu tokens, longer than the context (-c %lld)",
              prompts.size() > 1 ? labels[i].c_str() : "prompt", prompts.size() > 1 && !a.prompt_files.empty() ? "'s prompt" : "",
              prompts[i].size(), (long long)n_ctx);

  GenerateOptions go;
  go.n_predict = a.n_predict;
  go.ignore_eos = a.ignore_eos;
  go.sampler = SamplerConfig{a.temp, a.top_k, a.top_p, a.min_p, a.seed};
  SPC_CHECK(!a.no_kv_share || prompts.size() > 1,
            "--no-kv-share only applies to several prompts (-p or -f given more than once)");
  if (prompts.size() > 1) return run_generate_batch(a, *model, *tok, act, labels, prompts, n_ctx, go);
  const std::vector<int32_t>& prompt = prompts[0];

  ThreadPool pool(resolve_threads(a.m.threads));
  Session session(*model, make_kv_policy(a.kv, model->kv_geometry(n_ctx)), pool);
  const bool progress = !a.json && stderr_is_terminal() && prompt.size() >= 512;
  session.prefill(prompt, nullptr, progress ? Model::Progress([&](int done, int total) {
    std::fprintf(stderr, "\rprefill: %zu tokens, layer %d/%d", prompt.size(), done, total);
    if (done == total) std::fprintf(stderr, "\r\033[K");
    std::fflush(stderr);
  }) : Model::Progress());

  const GenerateResult res = generate(session, *tok, go, a.json ? std::function<void(const std::string&)>() : [](const std::string& s) {
    std::fwrite(s.data(), 1, s.size(), stdout);
    std::fflush(stdout);
  });
  if (res.stopped_at_context)
    std::fprintf(stderr, "\nspecache: note: stopped at the end of the context (%lld tokens)\n", (long long)n_ctx);

  const SessionTimings& t = session.timings();
  const KvStats ks = session.kv().stats();
  const double dms = t.decode_tokens ? t.decode_ms / t.decode_tokens : 0;
  if (a.json) {
    nlohmann::json j;
    j["prompt_tokens"] = prompt;
    j["tokens"] = res.tokens;
    j["text"] = res.text;
    j["timings"] = {{"prefill_ms", t.prefill_ms},
                    {"prefill_tok_per_s", t.prefill_ms > 0 ? t.prefill_tokens * 1000.0 / t.prefill_ms : 0},
                    {"decode_ms_per_token", dms},
                    {"decode_tok_per_s", dms > 0 ? 1000.0 / dms : 0},
                    {"decode_act", act.decode},
                    {"prefill_act", act.prefill},
                    {"prefill_attn", act.prefill_attn}};
    if (t.decode_tokens > 0)  // where the decode steps' time went, ms per real token
      j["timings"]["decode_phases_ms_per_token"] = bench::decode_phases_json(session.decode_phases(), (double)t.decode_tokens);
    j["kv"] = kv_json(session, a.kv.policy);
    j["memory"] = {{"peak_rss_bytes", peak_rss_bytes()}};
    std::puts(j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::fputc('\n', stdout);
    std::fprintf(stderr,
                 "\nspecache: prompt %zu tokens, prefill %.1f ms (%.1f tok/s); %lld decode steps, %.2f ms/token (%.1f tok/s); "
                 "KV %s: fast %.2f MiB, slow %.2f MiB; peak RSS %.1f MiB\n",
                 prompt.size(), t.prefill_ms, t.prefill_ms > 0 ? t.prefill_tokens * 1000.0 / t.prefill_ms : 0.0,
                 (long long)t.decode_tokens, dms, dms > 0 ? 1000.0 / dms : 0.0, ks.policy.c_str(),
                 ks.fast_bytes / 1048576.0, ks.slow_bytes / 1048576.0, peak_rss_bytes() / 1048576.0);
  }
  return 0;
}

}  // namespace

Runner add_generate(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  CLI::App* sub = app.add_subcommand("generate", "generate text from a prompt");
  add_model_flags(*sub, a->m);
  add_act_flags(*sub, a->m.act);
  sub->add_option("-p,--prompt", a->prompts,
                  "prompt text; given several times, the prompts are generated together as a batch (one decode step "
                  "for all sequences, each with its own KV cache; sampling seeds --seed + i)");
  sub->add_option("-f,--file", a->prompt_files, "read the prompt from a file; several files: a batch, as with -p");
  sub->add_option("-n,--n-predict", a->n_predict, "tokens to generate (-1: until EOS or context end)")->check(CLI::Range(-1, 1 << 30))->capture_default_str();
  sub->add_option("-c,--ctx-size", a->n_ctx, "context size (default: the model's trained context)")->check(CLI::Range((int64_t)0, (int64_t)1 << 26));
  sub->add_option("--temp", a->temp, "temperature (0: greedy)")->check(CLI::Range(0.0f, 100.0f))->capture_default_str();
  sub->add_option("--top-k", a->top_k, "top-k sampling (0: off)")->check(CLI::Range(0, 1 << 30))->capture_default_str();
  sub->add_option("--top-p", a->top_p, "top-p (nucleus) sampling (1: off)")->check(CLI::Range(0.0f, 1.0f))->capture_default_str();
  sub->add_option("--min-p", a->min_p, "min-p sampling (0: off)")->check(CLI::Range(0.0f, 0.999f))->capture_default_str();
  sub->add_option("--seed", a->seed, "random seed for sampling")->capture_default_str();
  sub->add_flag("--chat", a->chat, "wrap the prompt as a user message with the model's chat template");
  sub->add_flag("--ignore-eos", a->ignore_eos, "keep generating past end-of-generation tokens");
  sub->add_flag("--json", a->json, "print one JSON object (tokens, text, timings, kv) instead of streaming");
  sub->add_flag("--no-kv-share", a->no_kv_share,
                "with several prompts that begin alike: give each session a copy of the shared beginning's KV cache "
                "instead of reading the first one's (the default shares it, with the same results)");
  add_kv_flags(*sub, a->kv);
  return [sub, a] { return run_generate(*sub, *a); };
}

}  // namespace spc::cli
