// The generate loop shared by the CLI and the harnesses: prompt -> prefill -> sample/decode,
// streaming each piece of text as it is produced.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "engine/sampler.h"
#include "engine/session.h"
#include "engine/tokenizer.h"

namespace spc {

struct GenerateOptions {
  int n_predict = 128;       // tokens to generate (< 0: until EOS or context full)
  bool ignore_eos = false;
  SamplerConfig sampler;
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated ids (EOS excluded)
  std::string text;
  bool stopped_at_eos = false;
  bool stopped_at_context = false;
};

// Streams complete UTF-8 text: pieces may split a multi-byte character across tokens.
class Utf8Stream {
 public:
  // Appends bytes; returns the longest prefix of pending bytes that ends on a character boundary.
  std::string push(const std::string& bytes);
  std::string flush();  // whatever is left (possibly an incomplete sequence)

 private:
  std::string pending_;
};

// Runs generation on a session that has been prefilled with the prompt. on_text gets each
// complete UTF-8 chunk as soon as it is available.
GenerateResult generate(Session& session, const Tokenizer& tok, const GenerateOptions& opt,
                        const std::function<void(const std::string&)>& on_text = {});

// Prefills sessions[i] with prompts[i], one after the other. A prompt that begins with tokens an
// earlier prompt of the list also begins with takes those positions' K/V over from that earlier
// session (Session::prefill_from, the longest such run) and prefills only the rest: a continued
// prefill gives the same K/V and logits as a whole one, without computing the shared part again
// (N questions about one document prefill it once). Only where the policy keeps a complete 16-bit
// copy to hand on (kv_policy_keeps_16bit_copy), and only runs of at least min_shared tokens.
// share_cache: the positions taken over are shared, not copied, where the two sessions' policies
// allow (Session::prefill_from's share: the same policy and storage knobs; the document's cache is
// then held once for all the questions, with the same results bit for bit).
// Returns how many prompt tokens were taken over instead of prefilled.
int64_t prefill_sharing_prefixes(const std::vector<Session*>& sessions,
                                 const std::vector<std::vector<int32_t>>& prompts, int64_t min_shared = 64,
                                 bool share_cache = true);

// Batched generation: every session (each prefilled with its own prompt) generates as generate()
// would, and their decode steps run together through one SessionBatch, so the sequences share
// each weight read. Session i samples with seed opt.sampler.seed + i; a session that stops (EOS,
// n_predict, end of its context) leaves the batch. Greedy results equal generate()'s on each
// session alone. results[i] belongs to sessions[i].
std::vector<GenerateResult> generate_batch(const std::vector<Session*>& sessions, const Tokenizer& tok,
                                           const GenerateOptions& opt);

}  // namespace spc
