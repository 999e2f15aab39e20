// Microbenchmarks of the decode kernels (Google Benchmark), reporting bytes streamed per second:
// quantized matmul at the SmolLM2-135M shapes (n_tok 1 and 2; i8:0 fp32 activations, i8:1 int8
// over the GGUF rows, i8:2 int8 over the row-interleaved copy, which is what decode runs by
// default) and decode attention over an fp16 cache. The machine is small and shared: run with
// --benchmark_repetitions and compare the best (max) bytes_per_second, not the mean.
//   ./build/specache_kernel_bench --benchmark_repetitions=5 --benchmark_report_aggregates_only=false
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "kv/f16_cache.h"
#include "kv/kv_policy.h"
#include "kv/lowbit.h"
#include "ops/attention.h"
#include "ops/matmul.h"
#include "ops/quant.h"
#include "util/fp16.h"
#include "util/threadpool.h"

using namespace spc;

namespace {

ThreadPool& pool_of(int n) {
  static ThreadPool p1(1), p2(2);
  return n == 1 ? p1 : p2;
}

// Several copies of the weights so that the working set exceeds the caches (decode streams every
// matrix from DRAM once per token): at least 64 MiB in all, cycled through.
struct Weights {
  std::vector<std::vector<uint8_t>> copies;
  std::vector<std::vector<uint8_t>> i8x8;  // the copies repacked by i8x8_repack (when asked and supported)
  size_t bytes = 0;
};
// interleaved: also the copies repacked by i8x8_repack (repacked once, then copied), where the
// build has the kernel.
Weights make_weights(GgmlType t, int64_t n_out, int64_t n_in, bool hot, bool interleaved) {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 0.05f);
  const size_t rs = row_size(t, n_in);
  std::vector<float> row(n_in);
  std::vector<uint8_t> w(rs * n_out);
  for (int64_t o = 0; o < n_out; ++o) {
    for (auto& v : row) v = nd(rng);
    quantize_row(t, row.data(), w.data() + o * rs, n_in);
  }
  Weights ws;
  ws.bytes = w.size();
  const size_t n_copies = hot ? 1 : std::max<size_t>(1, (64u << 20) / w.size() + 1);
  for (size_t i = 0; i < n_copies; ++i) ws.copies.push_back(w);
  const WeightView wv{t, n_in, n_out, w.data()};
  if (interleaved && i8x8_bytes(wv) > 0) {
    std::vector<uint8_t> packed(i8x8_bytes(wv));
    i8x8_repack(wv, packed.data());
    ws.i8x8.assign(n_copies, packed);
  }
  return ws;
}

// hot: one copy of the weights, cache-resident when small (the kernel's compute ceiling).
// i8: 0 fp32 activations, 1 int8 activations over the GGUF rows, 2 int8 activations over the
// row-interleaved copy (what decode runs where the build has the kernel; bytes: the copy's).
void BM_Matmul(benchmark::State& st, GgmlType t, int64_t n_out, int64_t n_in, bool hot) {
  const int64_t n_tok = st.range(0);
  const int threads = (int)st.range(1);
  const bool int8 = st.range(2) != 0, interleaved = st.range(2) == 2;
  const Weights ws = make_weights(t, n_out, n_in, hot, interleaved);
  if (interleaved && ws.i8x8.empty()) {
    st.SkipWithError("no int8 interleaved kernel in this build");
    return;
  }
  std::vector<float> x(n_tok * n_in), y(n_tok * n_out);
  std::mt19937 rng(2);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto& v : x) v = nd(rng);
  ThreadPool& pool = pool_of(threads);
  size_t i = 0;
  for (auto _ : st) {
    WeightView wv{t, n_in, n_out, ws.copies[i].data()};
    if (interleaved) wv.i8x8 = ws.i8x8[i].data();
    matmul(wv, x.data(), n_tok, y.data(), pool, int8);
    benchmark::DoNotOptimize(y.data());
    i = (i + 1) % ws.copies.size();
  }
  st.SetBytesProcessed((int64_t)st.iterations() * (int64_t)(interleaved ? ws.i8x8[0].size() : ws.bytes));
}

// Decode attention of one layer over n_pos cached positions (3 KV heads, head_dim 64, 9 query
// heads): n_rows 1 -> n_q 3 per KV head, n_rows 2 -> n_q 6. Several layers cycled so the cache
// streams from DRAM.
void BM_AttnDecode(benchmark::State& st) {
  const int64_t n_pos = st.range(0);
  const int n_rows = (int)st.range(1);
  const int threads = (int)st.range(2);
  KvGeometry g{};
  g.n_layer = 8;
  g.n_head = 9;
  g.n_head_kv = 3;
  g.head_dim = 64;
  F16Cache cache(g, n_pos);
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> k(n_pos * g.n_head_kv * g.head_dim), v(k.size());
  for (auto& e : k) e = nd(rng);
  for (auto& e : v) e = nd(rng);
  for (int il = 0; il < g.n_layer; ++il) cache.write(il, 0, n_pos, k.data(), v.data());
  std::vector<float> q(n_rows * g.n_head * g.head_dim), out(q.size());
  for (auto& e : q) e = nd(rng);
  DecodeRows rows{};
  rows.q = q.data();
  rows.n_rows = n_rows;
  rows.pos0 = n_pos - n_rows;
  ThreadPool& pool = pool_of(threads);
  int il = 0;
  for (auto _ : st) {
    attend_f16_cache(cache, g, il, rows, out.data(), pool);
    benchmark::DoNotOptimize(out.data());
    il = (il + 1) % g.n_layer;
  }
  st.SetBytesProcessed((int64_t)st.iterations() * (int64_t)cache.bytes_for(n_pos) / g.n_layer);
}

void matmul_args(benchmark::internal::Benchmark* b) {
  for (int threads : {1, 2})
    for (int n_tok : {1, 2})
      for (int i8 : {0, 1, 2}) b->Args({n_tok, threads, i8});
  b->ArgNames({"tok", "thr", "i8"})->UseRealTime()->MinTime(0.2);
}

}  // namespace

#define SPC_MM(T, O, I) \
  BENCHMARK_CAPTURE(BM_Matmul, T##_##O##x##I, GgmlType::T, O, I, false)->Apply(matmul_args);
SPC_MM(Q4_1, 576, 576)
SPC_MM(Q4_1, 192, 576)
SPC_MM(Q4_1, 1536, 576)
SPC_MM(Q4_1, 576, 1536)
SPC_MM(Q8_0, 576, 576)
SPC_MM(Q8_0, 1536, 576)
SPC_MM(Q8_0, 49152, 576)
BENCHMARK_CAPTURE(BM_Matmul, hot_Q4_1_576x576, GgmlType::Q4_1, 576, 576, true)->Apply(matmul_args);
BENCHMARK_CAPTURE(BM_Matmul, hot_Q8_0_576x576, GgmlType::Q8_0, 576, 576, true)->Apply(matmul_args);

BENCHMARK(BM_AttnDecode)
    ->ArgsProduct({{8192}, {1, 2}, {1, 2}})
    ->ArgNames({"pos", "rows", "thr"})
    ->UseRealTime()
    ->MinTime(0.2);

// ---- Low-bit KV kernels (src/kv/lowbit.h) ----
// Scoring and value accumulation of n_q query rows over 8192 positions of one (layer, KV head)
// stream, d = 64, g = 64, 1 thread (the hot case of a specache decode: n_q = 3 per KV head, 6 with
// the speculative row). items_per_second counts positions.
namespace {

struct LowBitBenchData {
  LowBitSpec spec;
  int n_pos = 0, n_q = 0;
  std::vector<uint8_t> keys, values;
  std::vector<float> q, p, scores, out;
};

LowBitBenchData make_lowbit_data(int bits, int n_q, int n_pos) {
  LowBitBenchData b;
  b.spec = LowBitSpec{bits, 64, 64};
  b.n_pos = n_pos;
  b.n_q = n_q;
  const int d = b.spec.head_dim, g = b.spec.group, n_blocks = n_pos / g;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> k((size_t)n_pos * d), v((size_t)n_pos * d);
  for (auto& e : k) e = nd(rng);
  for (auto& e : v) e = nd(rng);
  b.keys.resize((size_t)n_blocks * b.spec.key_block_bytes());
  for (int blk = 0; blk < n_blocks; ++blk)
    lowbit_quantize_keys(b.spec, k.data() + (size_t)blk * g * d, d, b.keys.data() + blk * b.spec.key_block_bytes());
  b.values.resize((size_t)n_blocks * b.spec.value_block_bytes());
  for (int blk = 0; blk < n_blocks; ++blk)
    lowbit_quantize_values(b.spec, v.data() + (size_t)blk * g * d, d, b.values.data() + blk * b.spec.value_block_bytes());
  b.q.resize((size_t)n_q * d);
  for (auto& e : b.q) e = nd(rng) * 0.125f;
  b.p.resize((size_t)n_q * n_pos);  // softmax numerators exp(s - max): in (0, 1]
  for (auto& e : b.p) e = std::exp(-std::fabs(2.0f * nd(rng)));
  b.scores.resize((size_t)n_q * n_pos);
  b.out.assign((size_t)n_q * d, 0.0f);
  return b;
}

void BM_LowBitScore(benchmark::State& st) {
  auto b = make_lowbit_data((int)st.range(0), (int)st.range(1), 8192);
  const int n_blocks = b.n_pos / b.spec.group;
  for (auto _ : st) {
    lowbit_score_keys(b.spec, b.keys.data(), n_blocks, b.q.data(), b.n_q, b.spec.head_dim, b.scores.data(),
                      b.n_pos);
    benchmark::DoNotOptimize(b.scores.data());
    benchmark::ClobberMemory();
  }
  st.SetItemsProcessed((int64_t)st.iterations() * b.n_pos);
}

void BM_LowBitAccumulate(benchmark::State& st) {
  auto b = make_lowbit_data((int)st.range(0), (int)st.range(1), 8192);
  const int n_blocks = b.n_pos / b.spec.group;
  for (auto _ : st) {
    lowbit_accumulate_values(b.spec, b.values.data(), n_blocks, b.p.data(), b.n_q, b.n_pos, b.out.data(),
                             b.spec.head_dim);
    benchmark::DoNotOptimize(b.out.data());
    benchmark::ClobberMemory();
  }
  st.SetItemsProcessed((int64_t)st.iterations() * b.n_pos);
}

// The fused softmax and value sum that the decode attention runs (lowbit_softmax_values): the
// rows' scores become exp(s - m) in place, so every iteration after the first starts from
// numerators in (0, 1] with m = 1, the same work (the kernel has no data-dependent branches).
void BM_LowBitSoftmaxValues(benchmark::State& st) {
  auto b = make_lowbit_data((int)st.range(0), (int)st.range(1), 8192);
  const int n_blocks = b.n_pos / b.spec.group;
  b.scores = b.p;
  std::vector<float> m((size_t)b.n_q, 1.0f), l((size_t)b.n_q);
  for (auto _ : st) {
    lowbit_softmax_values(b.spec, b.values.data(), n_blocks, b.scores.data(), b.n_q, b.n_pos, m.data(), l.data(),
                          b.out.data(), b.spec.head_dim);
    benchmark::DoNotOptimize(b.out.data());
    benchmark::ClobberMemory();
  }
  st.SetItemsProcessed((int64_t)st.iterations() * b.n_pos);
}

// Both passes of the decode attention (scores with the debias term and row maxima, then the fused
// softmax and value sum) for 6 rows, 1 thread, over packed blocks as large as SmolLM2's whole
// low-bit cache at 32K positions (30 layers x 3 KV heads: 71 MB of key and value blocks at 1 bit),
// walked in chunks of 384 blocks as the engine's chunk tasks at 32K: the blocks come from DRAM, as
// in decode, not from L2 as in the benchmarks above. 64 distinct blocks are repeated (the kernels' work does not depend
// on the codes). items_per_second counts blocks (64 positions each).
void BM_LowBitAttendStream(benchmark::State& st) {
  const int bits = (int)st.range(0), n_q = 6, chunk = 384;
  auto b = make_lowbit_data(bits, n_q, 64 * 64);
  const LowBitSpec& sp = b.spec;
  const size_t kb = sp.key_block_bytes(), vb = sp.value_block_bytes();
  const int64_t n_blocks = (int64_t)30 * 3 * 32768 / sp.group / chunk * chunk;
  std::vector<uint8_t> keys((size_t)n_blocks * kb), values((size_t)n_blocks * vb);
  for (int64_t i = 0; i < n_blocks; ++i) {
    std::memcpy(keys.data() + i * kb, b.keys.data() + (i % 64) * kb, kb);
    std::memcpy(values.data() + i * vb, b.values.data() + (i % 64) * vb, vb);
  }
  const int64_t T = (int64_t)chunk * sp.group;
  std::vector<float> s((size_t)n_q * T), rm((size_t)n_q), l((size_t)n_q);
  for (auto _ : st) {
    for (int64_t c = 0; c < n_blocks; c += chunk) {
      lowbit_score_keys_ex(sp, keys.data() + c * kb, chunk, b.q.data(), n_q, sp.head_dim, s.data(), T, 0.5f, rm.data());
      lowbit_softmax_values(sp, values.data() + c * vb, chunk, s.data(), n_q, T, rm.data(), l.data(), b.out.data(),
                            sp.head_dim);
    }
    benchmark::DoNotOptimize(b.out.data());
    benchmark::ClobberMemory();
  }
  st.SetItemsProcessed((int64_t)st.iterations() * n_blocks);
}

// One whole decode step of a KV policy's attention (every layer of SmolLM2-135M's geometry: 30
// layers, 9 query / 3 KV heads, head_dim 64) after a synthetic prefill of n_pos positions, 2
// threads, as the engine calls it: begin_step, attend per layer, end_step (the cache grows by one
// position per iteration). Weights and the rest of the model are left out, so this is the part of
// decode ms/token that the policy owns; profile it with perf without a long real prefill. Random
// K/V spread the attention evenly (real text concentrates it), so the top-k buffer's reuse is low.
// miss: note a wrong guess before every step (specache-refetch's worst case: a refetch per step).
void BM_PolicyStep(benchmark::State& st, const char* policy, int bits, bool miss = false, const char* copy = "auto") {
  const int64_t n_pos = st.range(0);
  KvGeometry g{};
  g.n_layer = 30;
  g.n_head = 9;
  g.n_head_kv = 3;
  g.head_dim = 64;
  g.n_ctx = n_pos + 4096;
  KvConfig kc;
  kc.policy = policy;
  kc.bits = bits;
  kc.copy = copy;
  auto kv = make_kv_policy(kc, g);
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t row = (int64_t)g.n_head_kv * g.head_dim;
  // One layer's K/V, reused for every layer (generating 30 layers' worth would dominate the run).
  std::vector<float> k((size_t)n_pos * row), v(k.size());
  for (auto& e : k) e = fp16_to_fp32(fp32_to_fp16(nd(rng)));
  for (auto& e : v) e = fp16_to_fp32(fp32_to_fp16(nd(rng)));
  for (int il = 0; il < g.n_layer; ++il) kv->store_prefill(il, 0, n_pos, k.data(), v.data());
  const int n_rows = kv->wants_speculative_row() ? 2 : 1;
  std::vector<float> q((size_t)n_rows * g.n_head * g.head_dim), kr((size_t)n_rows * row), vr(kr.size()),
      out(q.size());
  ThreadPool& pool = pool_of(2);
  auto step = [&](int n_keep) {
    for (auto& e : q) e = 0.3f * nd(rng);
    for (auto& e : kr) e = nd(rng);
    for (auto& e : vr) e = nd(rng);
    kv->begin_step(n_rows, n_keep);
    DecodeRows rows{n_rows, n_keep, kv->n_cached(), q.data(), kr.data(), vr.data()};
    for (int il = 0; il < g.n_layer; ++il) kv->attend(il, rows, out.data(), pool);
    kv->end_step();
  };
  if (n_rows == 2) step(0);  // SpeCache's pre-decoding pass
  step(1);
  for (auto _ : st) {
    if (miss) kv->note_guess_miss();
    step(1);
    benchmark::DoNotOptimize(out.data());
    if (kv->n_cached() >= g.n_ctx - 1) st.SkipWithError("context full");
  }
}

}  // namespace

// Fixed iteration counts: the set-up (a synthetic prefill) runs once per invocation, and a
// MinTime would re-invoke it for every trial count.
BENCHMARK_CAPTURE(BM_PolicyStep, full, "full", 1)->Arg(512)->Arg(8192)->Arg(32768)->ArgName("pos")->UseRealTime()->Iterations(60);
BENCHMARK_CAPTURE(BM_PolicyStep, specache1, "specache", 1)
    ->Arg(512)
    ->Arg(8192)
    ->Arg(32768)
    ->ArgName("pos")
    ->UseRealTime()
    ->Iterations(60);
// The prefetch copies on the copy engine's own thread instead of the pool's idle workers (what
// --kv-copy auto picks when the pool's threads occupy every core, as on a 2-core machine).
BENCHMARK_CAPTURE(BM_PolicyStep, specache1_copy_thread, "specache", 1, false, "thread")
    ->Arg(512)
    ->Arg(8192)
    ->ArgName("pos")
    ->UseRealTime()
    ->Iterations(60);
BENCHMARK_CAPTURE(BM_PolicyStep, refetch1_every_step_misses, "specache-refetch", 1, true)
    ->Arg(8192)
    ->Arg(32768)
    ->ArgName("pos")
    ->UseRealTime()
    ->Iterations(60);

BENCHMARK(BM_LowBitScore)->ArgsProduct({{1, 2}, {3, 6}})->ArgNames({"bits", "nq"})->MinTime(0.2);
BENCHMARK(BM_LowBitAccumulate)->ArgsProduct({{1, 2}, {3, 6}})->ArgNames({"bits", "nq"})->MinTime(0.2);
BENCHMARK(BM_LowBitSoftmaxValues)->ArgsProduct({{1, 2}, {3, 6}})->ArgNames({"bits", "nq"})->MinTime(0.2);
BENCHMARK(BM_LowBitAttendStream)->Arg(1)->Arg(2)->ArgName("bits")->Iterations(8)->UseRealTime();

BENCHMARK_MAIN();
