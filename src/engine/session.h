// One sequence being generated: a model, its KV policy and the decode-step bookkeeping,
// including SpeCache's speculative row (pre-decoding pass, [real, speculative] steps).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "kv/kv_policy.h"
#include "model/model.h"

namespace spc {

class ThreadPool;

struct SessionTimings {
  double prefill_ms = 0;
  int64_t prefill_tokens = 0;
  double decode_ms = 0;       // all decode steps, pre-decoding included
  int64_t decode_tokens = 0;  // real tokens fed through decode
};

// How often SpeCache's guess was the token that actually came next (its row 1 then ran on the
// right token, so its queries, and the top-k they chose, were the real next token's).
struct GuessStats {
  int64_t checked = 0;  // decode steps whose previous step carried a guess row
  int64_t hits = 0;     // of those, steps whose real token equals that guess
  double hit_rate() const { return checked ? (double)hits / (double)checked : 0.0; }
};

// SpeCache's guess after a miss (KvConfig::guess == "lookup"): the token that followed the
// latest earlier occurrence of the longest suffix of `seq` (up to max_len tokens) found before;
// -1 when even seq's last token never occurred before. Prompt-lookup style, no draft model.
int32_t lookup_guess(const std::vector<int32_t>& seq, int max_len = 3);

class Session {
 public:
  Session(const Model& model, std::unique_ptr<KvPolicy> kv, ThreadPool& pool);

  // Exact prefill of the prompt after whatever is cached (nothing, a prefix taken over with
  // prefill_from, or an earlier prompt and its decoded tokens). After it, logits() predicts the
  // token after the prompt; the next decode of a speculative policy starts with its pre-decoding pass.
  void prefill(const std::vector<int32_t>& tokens, std::vector<float>* all_logits = nullptr,
               const Model::Progress& progress = {});

  // Takes over the first n_prefix positions (all when < 0) of another session's sequence
  // (prefill once, decode under several policies; or share a prompt prefix): their complete
  // 16-bit K/V are handed to this session's policy, layer by layer. Over a strict prefix the
  // logits are not known: a prefill of the rest must follow before decoding.
  // share: as much of the prefix as the policy can (KvPolicy::share_prefix: the same policy and
  // storage knobs) is taken over as read-only views of the other session's cache instead of a
  // copy, so N sessions after one document hold it once; the rest is copied.
  void prefill_from(const Session& other, int64_t n_prefix = -1, bool share = false);

  // The prompt and every real token decoded since: the positions the cache holds, in order.
  const std::vector<int32_t>& sequence() const { return seq_; }

  // Feeds the next real token through the policy's decode path; logits() then predicts the one after it.
  // Speculative policies run [token, guess] steps; the guess is the argmax of the last step's second row.
  void decode(int32_t token);

  const std::vector<float>& logits() const { return logits_; }
  int64_t n_past() const { return kv_->n_cached(); }
  KvPolicy& kv() { return *kv_; }
  const KvPolicy& kv() const { return *kv_; }
  const Model& model() const { return model_; }
  const SessionTimings& timings() const { return timings_; }
  // Where the decode steps' time went, summed over every step (pre-decoding included).
  const DecodePhases& decode_phases() const { return scratch_.phases; }
  const GuessStats& guesses() const { return guesses_; }

 private:
  friend class SessionBatch;
  // One decode step of n sessions (one model, one pool) fed tokens[i] each: their pending
  // pre-decoding passes as one batched step, then their [real, guess] or [real] rows as another.
  static void decode_together(Session* const* sessions, const int32_t* tokens, int n, ForwardScratch& scratch,
                              std::vector<float>& step_logits);

  const Model& model_;
  std::unique_ptr<KvPolicy> kv_;
  ThreadPool& pool_;
  ForwardScratch scratch_;
  std::vector<float> logits_;      // [n_vocab] after the last real token
  std::vector<float> step_logits_; // [rows][n_vocab]
  int32_t spec_next_ = -1;         // speculative guess for the position after the next real token
  int32_t spec_prev_ = -1;         // the guess row-1 of the last step ran on (the next real token, if right)
  std::vector<int32_t> seq_;       // the prompt and every real token decoded since (lookup_guess)
  SessionTimings timings_;
  GuessStats guesses_;
};

// Batched decode: several sessions of one model (each with its own policy, prompt and position)
// advance together, one step per call, so every weight matrix is read once per step for all of
// them. Each session gets the logits, cache and speculative bookkeeping that Session::decode
// would give it alone (every op but attention works row by row; tests/test_batch_decode.cpp), and
// its decode timings count the whole batched step. The sessions stay owned by the caller.
class SessionBatch {
 public:
  // Feeds tokens[i] to sessions[i]. Throws spc::Error, before any session changes, when the sizes
  // differ, a session appears twice, the sessions do not share one model and thread pool, or a
  // session's context is full.
  void decode(const std::vector<Session*>& sessions, const std::vector<int32_t>& tokens);
  // Where the batched steps' time went (Model::decode_batch's phases), summed over the calls.
  const DecodePhases& phases() const { return scratch_.phases; }

 private:
  ForwardScratch scratch_;
  std::vector<float> step_logits_;
};

}  // namespace spc
