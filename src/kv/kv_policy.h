// The KV-policy interface: everything the model knows about where K/V live and how decode
// attention reads them. The model hands K/V over and asks for attention outputs; it never sees
// the tiers, the low-bit copy or the prefetches. A policy never sees the model architecture:
// only the geometry below.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace spc {

class ThreadPool;

struct KvGeometry {
  int n_layer = 0;
  int n_head = 0;     // query heads
  int n_head_kv = 0;  // KV heads
  int head_dim = 0;
  int64_t n_ctx = 0;  // maximum number of cached positions
};

// Policy selection and knobs (the CLI's --kv* flags).
struct KvConfig {
  std::string policy = "full";  // full | kivi | specache | specache-refetch | specache-exact | streaming | topk-oracle
  int bits = 1;                 // low-bit copy: 1 or 2
  int group = 64;               // quantization group g: 32 or 64
  int topk = 64;                // 16-bit pairs fetched per layer and KV head
  int window = 64;              // residual window R of recent 16-bit tokens
  int sinks = 0;                // attention sinks kept in 16-bit (streaming; optional for others)
  // specache: weight of row 0's attention, shifted one position later, added to row 1's when
  // choosing the next top-k (0 = the paper's rule: row 1's attention alone). See ARCHITECTURE.
  float shift = 1.0f;
  // specache: the guess after a miss. "lookup": the guess row 1 made was conditioned on the wrong
  // token, so the next one comes from the sequence itself (the token after the latest earlier
  // occurrence of its last tokens; Session); "model": row 1's argmax always (the paper).
  std::string guess = "lookup";
  // Low-bit policies: the low-bit scores of positions attended in low bit are lowered by
  // debias * sigma^2/2, sigma^2 = sum_c q_c^2 s_c^2/12 (the variance of the score error of a key
  // quantized with step s_c per channel), so that their softmax mass is not inflated by
  // E[exp(error)] = exp(sigma^2/2) against the exact positions. 0 = the paper's scores. Negative:
  // the policy's default, filled in by resolve_kv_config.
  float debias = -1.0f;
  // specache / specache-refetch: how the pre-decoding pass (once per generation, after prefill)
  // selects the first top-k, which the first step's real row (the same token) then attends with.
  // "lowbit" (default): from the row's own low-bit scores (like specache-exact); "exact": from
  // exact 16-bit scores, read once from the slow tier (like topk-oracle, one step). The eval grid
  // of session 9 found no clear winner (docs/RESULTS.md), so the default stays the closer to the paper.
  std::string predecode = "lowbit";
  std::string store = "host";   // slow tier: host | file
  // specache / specache-refetch: who runs the asynchronous prefetch copies. "thread": the copy
  // engine's own thread; "pool": the decode thread pool's workers while they wait between jobs
  // (no wake-up system call, no preemption of a compute thread); "auto": pool when the pool has
  // a worker and occupies every hardware thread, else thread.
  std::string copy = "auto";
  std::string dir;              // directory for the file store
  bool diagnostics = false;     // compute expensive diagnostics (exact attention mass served)
  // Test hook: false makes the low-bit policies' selection pass read every position, not only the
  // blocks whose bound reaches the previous selection's threshold (same result either way).
  bool selection_bounds = true;
  uint32_t inject_delay_us = 0; // test hook: random copy delays up to this many microseconds
  uint64_t inject_seed = 1;
};

// Counters a policy reports; zero where not applicable.
struct KvStats {
  std::string policy;
  uint64_t fast_bytes = 0;             // peak bytes of KV data in the fast tier
  uint64_t slow_bytes = 0;             // bytes held by the slow tier
  double fetched_bytes_per_step = 0;   // mean bytes copied slow -> fast per decode step
  double prefetch_reuse_rate = 0;      // share of selected pairs already resident (not copied again)
  double spec_recall = 0;              // overlap of speculative top-k with the real token's own top-k
                                       // (low-bit policies: sampled every 4th step; every step with diagnostics)
  std::vector<double> spec_recall_per_layer;
  double exact_mass_served = -1;       // share of exact attention mass computed in 16-bit (-1: not measured)
  double stall_ms = 0;                 // compute waiting for transfers
  double copy_ms = 0;                  // time spent copying
  uint64_t decode_steps = 0;
  uint64_t refetch_steps = 0;          // specache-refetch: steps that fetched row 0's own top-k after a miss
  double selection_read_share = 0;     // low-bit policies: quantized blocks the top-k selections
                                       // read over those they covered (the rest bounded below their
                                       // threshold; a bounded pass that falls short, reading again,
                                       // counts twice)
  uint64_t shared_bytes = 0;           // KV data of a shared prompt prefix (share_prefix) this policy
                                       // reads from another session's memory: fast-tier bytes, not
                                       // in fast_bytes (slow-tier rows are not in slow_bytes either)
};

// The rows of one decode step: n_rows consecutive positions [pos0, pos0 + n_rows), causal among
// themselves (row r sees the cache and rows 0..r). Rows [0, n_keep) are appended to the cache;
// the others (SpeCache's speculative row) are discarded after the step. n_keep = 0 is SpeCache's
// pre-decoding pass (once after prefill): the low-bit policies let that row select and use its
// own top-k.
struct DecodeRows {
  int n_rows = 1;
  int n_keep = 1;
  int64_t pos0 = 0;
  const float* q = nullptr;  // [n_rows][n_head][head_dim], RoPE applied
  const float* k = nullptr;  // [n_rows][n_head_kv][head_dim], RoPE applied
  const float* v = nullptr;  // [n_rows][n_head_kv][head_dim]
};

class KvPolicy {
 public:
  virtual ~KvPolicy() = default;
  virtual const char* name() const = 0;
  virtual const KvGeometry& geometry() const = 0;

  // Positions stored so far (the next token's position).
  virtual int64_t n_cached() const = 0;

  // Whether each decode step should carry a speculative second row (SpeCache).
  virtual bool wants_speculative_row() const { return false; }
  // SpeCache: whether a guess invalidated by a miss is replaced by a lookup in the sequence
  // (KvConfig::guess == "lookup"); Session does the bookkeeping.
  virtual bool guess_by_lookup() const { return false; }
  // SpeCache: called by Session before a step whose real token differs from the guess the last
  // step's row 1 ran on (a miss). `specache-refetch` then selects and fetches that token's own
  // top-k synchronously for the step; the other policies ignore it.
  virtual void note_guess_miss() {}

  // Prefill hand-over, layer by layer: exact 16-bit-rounded K/V of positions [pos0, pos0+n) of
  // layer il. The model has already attended exactly over them. k, v: [n][n_head_kv][head_dim].
  // Called for every layer with the same range; n_cached() advances after the last layer.
  virtual void store_prefill(int il, int64_t pos0, int64_t n, const float* k, const float* v) = 0;

  // Decode: called once per step before layer 0 and once after the last layer.
  virtual void begin_step(int n_rows, int n_keep) = 0;
  virtual void end_step() = 0;

  // Attention for the step's rows at layer il. out: [n_rows][n_head][head_dim].
  virtual void attend(int il, const DecodeRows& rows, float* out, ThreadPool& pool) = 0;

  virtual KvStats stats() const = 0;

  // Copies the complete 16-bit K/V of layer il, positions [pos0, pos0 + n) with pos0 + n <=
  // n_cached(), into k, v ([n][n_head_kv][head_dim] fp32). Used to hand one prefill (or a prompt
  // prefix of it) to other sessions (eval) and by a continued prefill. Throws spc::Error where the
  // policy keeps no complete copy (kivi, streaming) or the range is out of bounds.
  virtual void export_layer(int il, int64_t pos0, int64_t n, float* k, float* v) const = 0;

  // Shared prompt prefix (several questions after one document): this policy, still empty, takes
  // positions [0, s) of `other` over as read-only views of other's memory instead of copies, for
  // the largest s <= n it can share whole, and returns s; n_cached() is then s, and the caller
  // hands [s, n) over with export_layer and store_prefill as usual. The result is the cache a
  // copy would give, bit for bit; decode attention over it differs from a copy's at most in the
  // float summation order where one pass straddles the end of the shared part. Policies keep
  // everything append-only, so the shared positions never change, and the views keep them alive
  // after `other` is gone. Returns 0 (nothing shared) where other is another policy or has other
  // knobs that shape the stored data, and by default: `full` shares whole key tiles (16
  // positions), the low-bit policies with a 16-bit copy (specache, specache-refetch,
  // specache-exact, topk-oracle) whole quantized blocks of g positions together with those
  // positions of the slow tier; kivi and streaming share nothing.
  virtual int64_t share_prefix(const KvPolicy& other, int64_t n) {
    (void)other, (void)n;
    return 0;
  }
};

// Builds the policy named in cfg. Throws spc::Error for unknown names or inconsistent knobs.
std::unique_ptr<KvPolicy> make_kv_policy(const KvConfig& cfg, const KvGeometry& geom);

// Names accepted by make_kv_policy.
const std::vector<std::string>& kv_policy_names();

// Whether the named policy keeps a low-bit copy (kivi, specache, specache-refetch,
// specache-exact, topk-oracle): the --kv-bits/--kv-group knobs apply to it.
bool kv_policy_has_lowbit_copy(const std::string& policy);

// Whether the named policy keeps the complete 16-bit K/V (everything but kivi and streaming), so
// that export_layer can hand its cache, or a prefix of it, to another session.
bool kv_policy_keeps_16bit_copy(const std::string& policy);

// cfg with its "policy default" fields filled in: debias < 0 -> 0.5 for the policies with a
// low-bit copy (measured best for specache on SmolLM2 and better for kivi too, docs/RESULTS.md;
// specache-exact's steps never apply it), 0 for the others.
KvConfig resolve_kv_config(KvConfig cfg);

}  // namespace spc
