// Quality evaluation of the KV policies against `full`: passkey retrieval, needle in a
// haystack, perplexity and agreement (KL, top-1, greedy) over context length x depth.
// One exact prefill per case is handed to every policy (Session::prefill_from), so all
// policies decode from identical K/V.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "engine/session.h"
#include "engine/tokenizer.h"
#include "kv/kv_policy.h"

namespace spc::eval {

// ---- policies -------------------------------------------------------------------------

struct PolicySpec {
  std::string label;  // as written: "kivi:1", "streaming"
  KvConfig kv;        // base --kv-* knobs with .policy and .bits set
};

// "full,kivi:1,specache:2" -> specs over `base`. Throws spc::Error for unknown names or bad bits.
std::vector<PolicySpec> parse_policies(const std::string& list, const KvConfig& base);

// Fast-tier budget of specache at 1 bit (group, window, topk from `base`) for n cached positions,
// in 16-bit positions per layer and KV head: n*(1 + 32/g)/16 + window + topk.
int64_t specache1_budget_positions(const KvConfig& base, int64_t n);

// The config a policy runs with at context length n: `streaming` gets sinks = 4 and
// window = specache1_budget_positions(n) - 4 (the same fast-tier budget as specache:1).
KvConfig config_for_length(const PolicySpec& p, int64_t n);

// ---- text and tasks --------------------------------------------------------------------

// Deterministic 64-bit mix of the seed and the case coordinates.
uint64_t case_seed(uint64_t seed, const std::string& task, int64_t length, int depth_index);

// Body of a Project Gutenberg file: after the "*** START OF" line, before "*** END OF", from the
// first paragraph of >= 200 characters (skips title pages and tables of contents); paragraphs
// joined by blank lines, line breaks inside a paragraph become spaces.
std::string gutenberg_body(const std::string& raw);

struct TaskPrompt {
  std::vector<int32_t> tokens;
  std::string text;
  std::string answer;  // what a correct output contains
  // The answer as the model would write it after the prompt (" " + answer, tokenized in context:
  // the tail of encode(text + " " + answer) when its head is `tokens`), for teacher forcing.
  std::vector<int32_t> answer_tokens;
  int64_t target = 0;  // requested length in tokens
  double depth = 0;
};

struct PasskeyOptions {
  int64_t length = 1024;
  double depth = 0.5;
  uint64_t seed = 1;
  int depth_index = 0;
};
// Filler "The grass is green. ..." repeated, "The pass key is NNNNN. Remember it. NNNNN is the pass
// key." inserted at `depth` (fraction of the filler repetitions), then "What is the pass key? The pass
// key is". The number of repetitions is adjusted so the token count is close to `length`.
TaskPrompt make_passkey(const Tokenizer& tok, const PasskeyOptions& o);

struct NiahOptions {
  int64_t length = 1024;
  double depth = 0.5;
  uint64_t seed = 1;
  int depth_index = 0;
  std::string needle = "The special magic number mentioned in this book is {N}.";  // {N}: the answer
  std::string question = "What is the special magic number mentioned in this book?";
  std::string answer_prefix = "The special magic number mentioned in this book is";
  std::string chat_template;  // non-empty: wrap haystack + question as a user message
};
// `haystack` is the body text (gutenberg_body). The needle goes in at a sentence boundary near
// `depth` of the haystack; the haystack is cut so the prompt is close to `length` tokens.
TaskPrompt make_niah(const Tokenizer& tok, const std::string& haystack, const NiahOptions& o);

// The first `length` tokens of `text` (add_bos_default), tokenizing only as much text as needed.
// Throws when the text is too short.
std::vector<int32_t> text_tokens(const Tokenizer& tok, const std::string& text, int64_t length);

// Scoring: the answer string appears in the output; a numeric answer must not touch other digits
// ("687171" does not contain the key 68717).
bool score_contains(const std::string& output, const std::string& answer);

// ---- metrics ---------------------------------------------------------------------------

// log-softmax in double.
std::vector<double> log_softmax(const float* logits, int n);
// -log p(token) in double.
double nll(const float* logits, int n, int32_t token);
// KL(p || q) of the distributions of two logit vectors (double).
double kl_divergence(const float* p_logits, const float* q_logits, int n);
// KL(p || q) with p given as log-probabilities.
double kl_divergence_logp(const std::vector<double>& logp, const float* q_logits, int n);

struct GreedyAgreement {
  double prefix = 0;      // matching positions before the first divergence / n
  double positional = 0;  // matching positions / n
};
GreedyAgreement greedy_agreement(const std::vector<int32_t>& ref, const std::vector<int32_t>& got);

// Teacher forcing on a prefilled session: for each token, calls on_logits(i, logits) with the
// distribution predicting tokens[i], then decodes tokens[i] (except after the last one when
// skip_last_decode).
void teacher_force(Session& s, const std::vector<int32_t>& tokens,
                   const std::function<void(size_t, const std::vector<float>&)>& on_logits,
                   bool skip_last_decode = true);
// Greedy continuation of n tokens (no EOS stop) on a prefilled session.
std::vector<int32_t> greedy_tokens(Session& s, int n);

// ---- the grid --------------------------------------------------------------------------

struct EvalOptions {
  std::vector<std::string> tasks = {"passkey", "niah", "ppl", "agree"};
  std::vector<PolicySpec> policies;
  std::vector<int64_t> lengths = {1024, 2048, 4096, 8192};
  std::vector<double> depths = {0, 0.25, 0.5, 0.75, 1};
  std::vector<uint64_t> seeds = {1};  // passkey / niah: one case per (seed, length, depth)
  bool share_prefix = true;  // passkey / niah: a case takes over the prompt prefix it shares with the previous one
  std::string haystack;  // body text for niah, ppl and agree
  NiahOptions niah;      // needle / question / chat template
  int gen = 16;
  int ppl_tokens = 256;
  int agree_tokens = 64;
  bool verbose = true;   // progress lines on stderr
};

struct CaseResult {
  std::string task, policy;
  int64_t length = 0;         // target length
  int64_t prompt_tokens = 0;  // actual prompt (prefill) length
  double depth = -1;          // passkey / niah only
  int64_t seed = -1;          // passkey / niah only
  double score = 0;           // passkey/niah: 1 solved / 0; ppl: perplexity; agree: mean KL
  std::map<std::string, double> metrics;
  std::string answer, output;
  KvConfig kv;
  KvStats stats;
  double decode_ms_per_token = 0;
  double prefill_ms = 0;      // the shared full prefill of this case (of its tokens after prefill_reused)
  int64_t prefill_reused = 0; // leading prompt tokens taken over from the previous case's prefill (same K/V)
};

using ResultSink = std::function<void(const CaseResult&)>;

// Throws spc::Error naming the first entry that is not one of passkey, niah, ppl, agree.
void check_tasks(const std::vector<std::string>& tasks);

// Runs every task x length x (depth) x policy. Each result is also passed to on_result as soon as
// it is known (for progress / partial output).
std::vector<CaseResult> run_eval(const Model& model, const Tokenizer& tok, ThreadPool& pool, const EvalOptions& o,
                                 const ResultSink& on_result = {});

// ---- reports ---------------------------------------------------------------------------

std::string markdown_report(const std::vector<CaseResult>& r, const EvalOptions& o);
std::string csv_report(const std::vector<CaseResult>& r);
std::string json_report(const std::vector<CaseResult>& r, const EvalOptions& o);
// Reads the cases of a json_report back (to merge runs of different lengths into one report).
// Throws spc::Error for malformed input.
std::vector<CaseResult> results_from_json(const std::string& text);
// One heat map (length x depth) for task and policy; empty string when no cell exists.
std::string heatmap_svg(const std::vector<CaseResult>& r, const std::string& task, const std::string& policy);
// Writes <dir>/<task>_<policy>.svg for passkey and niah; returns the paths written.
std::vector<std::string> write_heatmaps(const std::vector<CaseResult>& r, const std::string& dir);

}  // namespace spc::eval
