// SpeCache on the real default model (SmolLM2-135M-Instruct Q4_1) with a ~4K-token real-text
// prompt: teacher-forced along full's greedy continuation of 64 tokens, how often 1-bit specache
// (default knobs) picks full's top-1 token; fast-tier bytes against full's.
// Measured here (fp32-activation matmul, same prompt): 56/64 with the defaults (--kv-shift 1,
// --kv-guess lookup: guess hit rate 0.62, spec recall 0.36, 41/41 confident positions, free-running
// 7/64; with --kv-guess model the same 56/64 at hit rate 0.41, recall 0.35, 40/41, 1/64), 58/64 with the paper's selection rule (--kv-shift 0;
// hit rate 0.33, recall 0.43; 54/64 before the pre-decoding row used its own top-k), 58/64 with
// --kv-sinks 1, 61/64 for 2-bit, specache-exact:1 56/64, topk-oracle:1 58/64, kivi:1 40/64,
// kivi:2 58/64. The shifted real row trades a little of this text's agreement for retrieval
// (needle cells, docs/RESULTS.md).
// The 95% (61/64) is NOT reached at 1 bit on this 135M model. The misses sit where full
// itself hesitates: with the paper's rule, of the 6, five are at positions where full's top-1
// leads its top-2 by < 0.2 logits and one at 0.71; 40 of the 41 positions with a lead >= 1 agree
// with the defaults (39/41 with the paper's rule).
// specache-refetch:1 (a synchronous fetch of row 0's own top-k after each miss): 56/64 here too,
// with 29 refetches in 65 steps (on the eval's agree text at 4K: 0.86 against specache:1's 0.72).
// Since session 7's score debiasing: 59/64. Session 9: 57/64 with --kv-predecode exact (the first
// step's top-k from exact scores; near-tie positions flip both ways), 59/64 with the default.
// Session 10: 59/64 on the AVX2 build and 57/64 on the AVX-512 build of the same commit (also
// of session 9's last commit): the two kernel paths round the packed sums differently, and that
// flips two near-tie positions; 41/41 confident positions agree on both. Session 11 (the FFN gate's
// exp through exp_approx, same values to ~1e-7): 59/64 on AVX-512, 58/64 on AVX2, 41/41 on both.
// Session 15 (the low-bit value weights' exponentials through exp_fast, relative error < 4e-6):
// 58/64 on both builds (AVX-512 was 59 before it, AVX2 58), 41/41 on both.
// Session 24 (the AVX2 kernels' debias term folded into the score kernel, their exponentials into
// the value preparation; AVX-VNNI builds): 57/64 on the AVX2 and AVX2 + AVX-VNNI builds (58 before),
// 58/64 on AVX-512, 41/41 on all.
// The test reports agreement by margin and guards both the overall count and the confident positions against regressions.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "engine/sampler.h"
#include "engine/session.h"
#include "engine/tokenizer.h"
#include "model/model.h"
#include "test_util.h"
#include "util/threadpool.h"

using namespace spc;

TEST(SpecacheQuality, SmolLM2FourKTeacherForcedAgreement) {
  SMOLLM2_WITH_BOOK(model, prompt, 17500, 4096);

  ThreadPool pool(2);
  const int64_t n_ctx = 4096 + 128;
  KvConfig full_cfg;
  Session full(*model, make_kv_policy(full_cfg, model->kv_geometry(n_ctx)), pool);
  full.prefill(prompt);
  KvConfig spec_cfg;
  spec_cfg.policy = "specache";
  spec_cfg.bits = 1;
  spec_cfg.group = 64;
  Session spec(*model, make_kv_policy(spec_cfg, model->kv_geometry(n_ctx)), pool);
  spec.prefill_from(full);
  Session spec_free(*model, make_kv_policy(spec_cfg, model->kv_geometry(n_ctx)), pool);
  spec_free.prefill_from(full);
  KvConfig refetch_cfg = spec_cfg;
  refetch_cfg.policy = "specache-refetch";
  Session refetch(*model, make_kv_policy(refetch_cfg, model->kv_geometry(n_ctx)), pool);
  refetch.prefill_from(full);

  // Teacher forcing along full's greedy continuation.
  const int n = 64;
  const int nv = model->config().n_vocab;
  std::vector<int32_t> full_greedy;
  int agree = 0, confident = 0, confident_agree = 0, refetch_agree = 0;
  for (int i = 0; i < n; ++i) {
    const float* fl = full.logits().data();
    const int32_t t = argmax(fl, nv);
    float second = -INFINITY;
    for (int j = 0; j < nv; ++j)
      if (j != t) second = std::max(second, fl[j]);
    const bool same = argmax(spec.logits().data(), nv) == t;
    agree += same;
    refetch_agree += argmax(refetch.logits().data(), nv) == t;
    if (fl[t] - second >= 1.0f) {
      ++confident;
      confident_agree += same;
    }
    full_greedy.push_back(t);
    full.decode(t);
    spec.decode(t);
    refetch.decode(t);
  }
  // Free-running greedy agreement (reported).
  int free_same = 0, free_prefix = -1;
  for (int i = 0; i < n; ++i) {
    const int32_t t = argmax(spec_free.logits().data(), nv);
    if (t == full_greedy[i]) ++free_same;
    else if (free_prefix < 0) free_prefix = i;
    spec_free.decode(t);
  }
  if (free_prefix < 0) free_prefix = n;
  const KvStats fs = full.kv().stats(), ss = spec.kv().stats();
  const double ratio = (double)ss.fast_bytes / fs.fast_bytes;
  RecordProperty("teacher_forced_top1_agreement", std::to_string(agree) + "/" + std::to_string(n));
  RecordProperty("free_running_greedy_same", std::to_string(free_same) + "/" + std::to_string(n));
  RecordProperty("free_running_identical_prefix", std::to_string(free_prefix));
  RecordProperty("fast_bytes_ratio", std::to_string(ratio));
  RecordProperty("spec_recall", std::to_string(ss.spec_recall));
  RecordProperty("guess_hit_rate", std::to_string(spec.guesses().hit_rate()));
  RecordProperty("refetch_teacher_forced_top1_agreement", std::to_string(refetch_agree) + "/" + std::to_string(n));
  RecordProperty("confident_top1_agreement", std::to_string(confident_agree) + "/" + std::to_string(confident));
  std::printf("specache 1-bit g=64 vs full at %zu tokens: teacher-forced top-1 %d/%d (%d/%d where full's top-1 leads by "
              ">= 1 logit), free-running %d/%d (identical prefix %d), fast bytes %.1f%% of full (%.2f / %.2f MiB), "
              "spec recall %.2f, guess hit rate %.2f, reuse %.2f\n",
              prompt.size(), agree, n, confident_agree, confident, free_same, n, free_prefix, 100 * ratio,
              ss.fast_bytes / 1048576.0, fs.fast_bytes / 1048576.0, ss.spec_recall, spec.guesses().hit_rate(),
              ss.prefetch_reuse_rate);
  std::printf("specache-refetch 1-bit: teacher-forced top-1 %d/%d, %llu refetch steps of %llu\n", refetch_agree, n,
              (unsigned long long)refetch.kv().stats().refetch_steps, (unsigned long long)refetch.kv().stats().decode_steps);
  EXPECT_GE(agree, 54) << "teacher-forced top-1 agreement regressed";
  EXPECT_GE(refetch_agree, 54) << "specache-refetch teacher-forced top-1 agreement regressed";
  EXPECT_GE(confident_agree * 100, confident * 90) << "disagreement where full is confident";
  // The fast tier holds the 1-bit copy (24 B per token and head at g = 64, 9.4% of 16-bit), the
  // window (R..R+g-1 tokens) and the top-k buffer (k rows, filled in place): at 4K tokens the
  // (R + g - 1 + k) fixed rows weigh ~4.6% on top of the 9.4% (13.7% measured).
  EXPECT_LT(ratio, 0.14);
}
