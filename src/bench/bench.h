// `specache bench`: decode-speed measurement over (KV policy, context depth, threads), with the
// bytes each decoded token reads per memory tier, a memory-bandwidth probe to put the times
// against, and CSV / JSON / SVG writers. The CLI (cli/cmd_bench.cpp) only parses flags and
// prints; everything testable lives here.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kv/kv_policy.h"
#include "model/model.h"

namespace spc {

class Model;
class Tokenizer;
class ThreadPool;

namespace bench {

// ---- policy specs: "name[:bits]" ----------------------------------------------------------

struct PolicySpec {
  std::string text;    // as given, e.g. "specache:2"
  std::string policy;  // "specache"
  int bits = 0;        // 0: not given (the --kv-bits default applies)
};

// Parses one spec. Syntax errors (empty name, bad characters, bits other than 1 or 2) throw
// spc::Error. Whether the name is a policy is checked by validate_policy_specs().
PolicySpec parse_policy_spec(const std::string& s);
// Comma-separated list; empty items are errors.
std::vector<PolicySpec> parse_policy_list(const std::string& s);
// defaults with policy (and bits, where given) replaced.
KvConfig apply_policy_spec(const KvConfig& defaults, const PolicySpec& spec);
// Bits of the low-bit copy as a row reports them: cfg.bits for kivi, specache, specache-exact and
// topk-oracle; 0 for policies without a low-bit copy.
int reported_bits(const KvConfig& cfg);
// Builds each policy once on a tiny geometry so an unknown name or bad knob fails before any
// model work; rethrows make_kv_policy's spc::Error prefixed with the spec.
void validate_policy_specs(const std::vector<PolicySpec>& specs, const KvConfig& defaults);

// Comma-separated positive integers ("512,2048,8192"); spc::Error on anything else.
std::vector<int64_t> parse_int_list(const std::string& s, const char* what);

// ---- byte accounting ------------------------------------------------------------------------

// Bytes one decoded token reads, per tier.
struct TokenBytes {
  uint64_t weights = 0;  // every weight matrix once + one embedding row
  uint64_t kv_fast = 0;  // the policy's fast-tier KV data, read in full each step
  double kv_slow = 0;    // mean bytes fetched from the slow tier per step
  double total() const { return (double)weights + (double)kv_fast + kv_slow; }
};
// kv: the policy's stats at the measured depth (fast_bytes) and after decoding (fetched_bytes_per_step).
TokenBytes token_bytes(uint64_t weight_bytes_per_token, const KvStats& at_depth, const KvStats& after_decode);
// 16-bit K and V of `depth` positions: depth * n_layer * n_head_kv * head_dim * 2 (K, V) * 2 bytes.
uint64_t full_kv_bytes(const KvGeometry& g, int64_t depth);

// ---- summary statistics ---------------------------------------------------------------------

struct Spread {
  size_t n = 0;
  double median = 0, min = 0, max = 0, p25 = 0, p75 = 0, mean = 0;
};
// Linear-interpolated quantiles (numpy's default); all zeros for an empty input.
Spread summarize(std::vector<double> v);

// ---- memory bandwidth probe -----------------------------------------------------------------

struct BandwidthResult {
  int threads = 0;
  size_t buffer_bytes = 0;
  int passes = 0;
  double best_gb_per_s = 0;    // GB = 1e9 bytes
  double median_gb_per_s = 0;
};
// Reads (sums) a buffer of `bytes` with `threads` threads, `passes` times after one untimed
// warm-up pass; the buffer is first-touched by the thread that reads each part.
BandwidthResult probe_read_bandwidth(size_t bytes, int threads, int passes);

// ---- machine / build description ------------------------------------------------------------

struct BuildInfo {
  std::string git_commit;  // short hash, "+dirty" when the tree had changes at build time
  std::string build_type;
  std::string compiler;
  std::string cxx_flags;
};
BuildInfo build_info();
std::string cpu_model_name();  // /proc/cpuinfo "model name", "" if unknown
// Resets the kernel's peak-RSS counter (VmHWM) through /proc/self/clear_refs; false if refused.
bool reset_peak_rss();

// ---- prompts --------------------------------------------------------------------------------

struct PromptSource {
  std::string kind;  // "text" | "synthetic"
  std::string path;  // text file ("" for synthetic)
  std::vector<int32_t> tokens;  // at least the largest depth; each depth takes a prefix
};
// Tokenizes `text` (if not empty) and repeats it until `n_tokens` tokens exist; with empty text
// (or no tokenizer), synthetic ids cycling through the vocabulary. Starts with BOS where the
// model's convention adds one. Deterministic.
PromptSource build_prompt_tokens(const Tokenizer* tok, int n_vocab, const std::string& text, const std::string& path,
                                 int64_t n_tokens);

// ---- the measurement ------------------------------------------------------------------------

struct BenchOptions {
  std::string model_path;
  std::vector<PolicySpec> policies;
  std::vector<int64_t> depths;
  std::vector<int> threads;
  int reps = 1;     // fresh-session repetitions of each (prefill + decode) measurement
  int gen = 16;     // decoded tokens per repetition
  int warmup = 2;   // leading decode steps of each repetition excluded from the statistics
  // Per (depth, threads, repetition): one session of every policy, decoding a step of each in
  // turn, so that the machine's slow spells hit every policy alike (paired_ratio).
  bool interleave = false;
  // Batched decode (--batch): per (policy, depth, threads), one row per batch size B: B sequences
  // of the policy decode together (SessionBatch), each with its own cache of the same prompt (the
  // first is prefilled, the others take its K/V over). Not with interleave.
  std::vector<int> batches{1};
  // --batch-share: the batched rows' later sequences share the first one's cache of the prompt
  // (KvPolicy::share_prefix: N questions about one document, which is held once) instead of each
  // holding a copy (N documents of the same length). Each later sequence's last min(32, depth/4)
  // tokens are its own (a slice from elsewhere in the prompt, prefilled after the shared part), so
  // the sequences decode different tokens. Only with some batch size above 1.
  bool batch_share = false;
  // Bandwidth probe after each row (--bandwidth): with probe_bytes > 0, the read bandwidth is
  // probed again right after the row's decode steps (and after its peak RSS is read, so the
  // probe's buffer never counts), with the row's thread count; the row's floor then uses that
  // time-local figure instead of the one probed when the run started (a shared host's memory
  // bandwidth drifts by 1.5x over minutes, and the floor would drift with it).
  size_t probe_bytes = 0;
  int probe_passes = 3;
  KvConfig kv;      // defaults for what the specs do not set
};

struct BenchRow {
  std::string model;
  std::string policy_spec, policy;
  int bits = 0;  // the low-bit copy's bits; 0 for policies without one (full, streaming)
  int64_t depth = 0;
  int threads = 0;
  // Sequences decoded together (BenchOptions::batches). With batch B > 1 a row's "per token"
  // figures are per decode step, which gives each of the B sequences one token: decode_ms is the
  // step time, the bytes count the weights once and every sequence's KV, the KV sizes, stall and
  // copy times are summed over the sequences, and batch_tok_per_s = B / step time.
  int batch = 1;
  bool batch_share = false;  // the batch's sequences share one cache of the prompt (BenchOptions::batch_share)
  int reps = 0;
  int gen = 0;
  size_t decode_samples = 0;
  double prefill_ms = 0;          // median over reps
  double prefill_tok_per_s = 0;   // median over reps
  Spread decode_ms;               // per-token decode times, warm-up steps excluded, pooled over reps
  TokenBytes bytes;
  double achieved_gb_per_s = 0;   // bytes.total() / median decode time
  double batch_tok_per_s = 0;     // tokens per second over the whole batch: batch * 1000 / median decode time
  uint64_t kv_fast_bytes = 0;     // fast-tier KV at the end of decoding (peak)
  uint64_t kv_slow_bytes = 0;
  double stall_ms_per_token = 0;
  double copy_ms_per_token = 0;
  uint64_t peak_rss_bytes = 0;
  bool peak_rss_reset = false;    // whether the peak was reset before this row (else process-wide)
  // Only with --bandwidth:
  double bandwidth_gb_per_s = 0;  // probe with this row's thread count: right after its decode
                                  // (BenchOptions::probe_bytes), else the run's initial probe
  double floor_ms = 0;            // bytes.total() / bandwidth
  double floor_ratio = 0;         // decode median / floor
  // Only when interleaved: median over decode steps of this policy's step time over the first
  // policy's at the same step (1 for the first policy); 0 otherwise.
  double paired_ratio = 0;
  // Where a measured decode step's time went, mean ms per step (Session::decode_phases; steps =
  // the measured steps). Their sum is a little below decode_ms' mean: the sampling between steps
  // and the session's own bookkeeping are outside the model.
  DecodePhases phases_ms;
};

struct BenchReport {
  std::string model_path;
  std::string prompt_kind, prompt_path;
  BuildInfo build;
  std::string cpu;
  int hardware_threads = 0;
  std::string decode_act = "fp32";   // activations of the decode matmuls: fp32 or int8 (--act)
  std::string prefill_act = "fp32";  // of the prompt's matmuls (--prefill-act; Model::int8_prefill)
  std::string prefill_attn = "fp32";  // the prompt's attention: fp32, bf16 or int8 (--prefill-attn; Model::prefill_attn)
  std::string measurement;  // one sentence on what the numbers are
  bool interleaved = false;  // BenchOptions::interleave
  std::vector<BandwidthResult> bandwidth;  // empty without --bandwidth
  std::vector<BenchRow> rows;
};

// Throws spc::Error for batch sizes outside 1..256, an empty list, or batches with interleave
// (run_bench checks it too; the CLI calls it before loading the model).
void validate_batches(const BenchOptions& opt);

using BenchLog = std::function<void(const std::string&)>;
// Runs the whole grid: threads x policies x depths. `text`/`text_path`: the prompt text (may be empty).
void run_bench(const Model& model, const Tokenizer* tok, const BenchOptions& opt, const std::string& text,
               const std::string& text_path, BenchReport& report, const BenchLog& log = {});
// Fills floor_ms / floor_ratio from each row's bandwidth_gb_per_s; rows without their own probe
// first take report.bandwidth's (closest thread count).
void apply_bandwidth(BenchReport& report);

// ---- writers --------------------------------------------------------------------------------

std::vector<std::string> csv_columns();
std::string to_csv(const BenchReport& r);     // header + one line per row
nlohmann::json to_json(const BenchReport& r);
// The six phases' times divided by `per` (1 for means already; a token count for sums): the
// object of bench rows (decode_phases_ms, plus its step count) and generate --json
// (decode_phases_ms_per_token).
nlohmann::json decode_phases_json(const DecodePhases& p, double per = 1.0);
std::string to_table(const BenchReport& r);   // human-readable, fixed-width
// Decode ms/token (median, with min-max whiskers) against depth, one polyline per series
// (policy spec, plus "@Nt" when several thread counts were measured).
std::string to_svg(const BenchReport& r);

}  // namespace bench
}  // namespace spc
