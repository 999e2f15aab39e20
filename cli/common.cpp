#include "common.h"

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>

#include "util/error.h"

namespace spc::cli {

void add_model_flags(CLI::App& app, ModelArgs& a) {
  app.add_option("-m,--model", a.model, "GGUF model file")->required();
  app.add_option("-t,--threads", a.threads, "threads (default: all hardware threads)")->check(CLI::Range(0, 1024));
}

void add_act_flags(CLI::App& app, ActArgs& a) {
  CLI::Option* act =
      app.add_option("--act", a.act,
                     "activations of the decode matmuls: int8 (quantized per block of 32 for integer dot products, as "
                     "llama.cpp does; mean KL ~1e-3 from fp32), fp32 (exact), or auto (int8 where the build has SIMD "
                     "int8 kernels, AVX-512 VNNI or AVX2, for the model's quantized matrices, else fp32)")
          ->check(CLI::IsMember({"auto", "int8", "fp32"}))
          ->capture_default_str();
  app.add_flag("--int8-act", a.int8_flag, "the same as --act int8")->excludes(act);
  app.add_option("--prefill-act", a.prefill,
                 "activations of the prompt's matmuls: auto (int8 wherever decode runs int8 through the interleaved "
                 "int8 kernels, i.e. builds with AVX2 or AVX-512: prefill 1.4-3.2x faster on SmolLM2, and with int8 decode a mean KL "
                 "~2e-3 from fp32 throughout against ~1.6e-3 for int8 decode alone; else fp32) or fp32")
      ->check(CLI::IsMember({"auto", "fp32"}))
      ->capture_default_str();
  app.add_option("--prefill-attn", a.prefill_attn,
                 "dot products of the prompt's attention: bf16 (vdpbf16ps: Q, K, V and the softmax weights rounded to "
                 "bf16; SmolLM2: mean KL ~1e-5 from fp32), int8 (scores from int8 codes of each query and key vector, "
                 "vpdpbusd, values in bf16: ~1.25x faster attention, KL ~1e-4 on SmolLM2, but keys with large "
                 "per-channel offsets lose precision), both on AVX-512 BF16 + VNNI builds only, with sums in fp32; "
                 "amx (bf16's roundings on AMX tiles, CPUs with AMX-BF16: on a Xeon prefill 1.9x faster at 8K than with "
                 "fp32 attention, 4x at 32K than with bf16); "
                 "fp32; or auto (amx where the CPU has it, else bf16 where the build has it, else fp32)")
      ->check(CLI::IsMember({"auto", "amx", "int8", "bf16", "fp32"}))
      ->capture_default_str();
}

ActChoice apply_act(const ActArgs& a, Model& m) {
  const std::string act = a.int8_flag ? "int8" : a.act;
  m.set_int8_decode(act == "int8" || (act == "auto" && m.int8_decode_supported()));
  m.set_int8_prefill(a.prefill == "auto");
  using PA = Model::PrefillAttn;
  const PA attn = a.prefill_attn == "fp32"   ? PA::fp32
                  : a.prefill_attn == "int8" ? PA::int8
                  : a.prefill_attn == "amx"  ? PA::amx
                  : a.prefill_attn == "bf16" ? PA::bf16
                  : m.prefill_attn_supported(PA::amx) ? PA::amx
                                                      : PA::bf16;  // auto
  SPC_CHECK(a.prefill_attn == "auto" || m.prefill_attn_supported(attn),
            "--prefill-attn %s: no such attention kernel here (%s; use auto or fp32)", a.prefill_attn.c_str(),
            attn == PA::amx ? "amx needs a CPU with AMX-BF16 and Linux's permission for its tile state, an AVX-512 BF16 "
                              "build, and head_dim a multiple of 32 up to 128"
                            : "it needs an AVX-512 BF16 and VNNI build");
  m.set_prefill_attn(attn);
  return ActChoice{m.int8_decode() ? "int8" : "fp32", m.int8_prefill() ? "int8" : "fp32",
                   Model::prefill_attn_name(m.prefill_attn())};
}

int resolve_threads(int requested) {
  const unsigned hc = std::thread::hardware_concurrency();
  if (requested <= 0) return hc ? (int)hc : 1;
  warn_oversubscribed(requested);
  return requested;
}

void warn_oversubscribed(int threads) {
  const unsigned hc = std::thread::hardware_concurrency();
  // The pool's workers spin between the hundreds of small jobs of a decode step; with more
  // threads than hardware threads they take turns on the cores instead (stories260K, 2 cores:
  // 3.0 ms/token with -t 64 against 0.12 with -t 2).
  if (hc > 0 && (unsigned)threads > hc)
    std::fprintf(stderr,
                 "specache: warning: %d threads on %u hardware threads: the extra threads share cores, which slows "
                 "decoding down many times over\n",
                 threads, hc);
}

void add_kv_flags(CLI::App& app, KvConfig& kv) {
  std::string names;
  for (const auto& n : kv_policy_names()) names += (names.empty() ? "" : ", ") + n;
  app.add_option("--kv", kv.policy, "KV policy: " + names)->capture_default_str();
  app.add_option("--kv-bits", kv.bits, "bits of the low-bit KV copy (1 or 2)")->check(CLI::IsMember({1, 2}))->capture_default_str();
  app.add_option("--kv-group", kv.group, "quantization group size g (32 or 64)")->check(CLI::IsMember({32, 64}))->capture_default_str();
  app.add_option("--kv-topk", kv.topk, "16-bit KV pairs fetched per layer and KV head")->check(CLI::Range(0, 1 << 20))->capture_default_str();
  app.add_option("--kv-window", kv.window, "residual window of recent 16-bit tokens")->check(CLI::Range(0, 1 << 20))->capture_default_str();
  app.add_option("--kv-sinks", kv.sinks, "attention-sink tokens kept in 16-bit")->check(CLI::Range(0, 1 << 20))->capture_default_str();
  app.add_option("--kv-shift", kv.shift,
                 "specache: weight of the real row's attention, shifted one position later, in the choice of the next "
                 "top-k beside the speculative row's (0: the paper's rule, speculative row only)")
      ->check(CLI::Range(0.0f, 16.0f))
      ->capture_default_str();
  app.add_option("--kv-debias", kv.debias,
                 "low-bit policies: lower the low-bit scores by this multiple of half their estimated error variance, "
                 "so the low-bit positions' softmax mass is not inflated against the 16-bit ones (0: the paper's scores; "
                 "default 0.5; specache-exact's own top-k already removes the bias)")
      ->check(CLI::Range(0.0f, 4.0f));
  app.add_option("--kv-guess", kv.guess,
                 "specache: the guess after a miss: lookup (the token that followed the latest earlier occurrence of the "
                 "sequence's last tokens) or model (the speculative row's argmax, the paper's rule)")
      ->check(CLI::IsMember({"lookup", "model"}))
      ->capture_default_str();
  app.add_option("--kv-predecode", kv.predecode,
                 "specache: how the pre-decoding pass after the prompt picks the first top-k, which the first real "
                 "token attends with: lowbit (from its own low-bit scores) or exact (from exact 16-bit scores, one read "
                 "of the slow tier per generation)")
      ->check(CLI::IsMember({"exact", "lowbit"}))
      ->capture_default_str();
  app.add_option("--kv-store", kv.store, "slow tier: host or file")->check(CLI::IsMember({"host", "file"}))->capture_default_str();
  app.add_option("--kv-dir", kv.dir, "directory for the file store (--kv-store file)");
  app.add_option("--kv-copy", kv.copy,
                 "specache: who runs the prefetch copies: thread (the copy engine's own thread), pool (the decode "
                 "threads while they wait between jobs) or auto (pool when the threads occupy every core)")
      ->check(CLI::IsMember({"auto", "thread", "pool"}))
      ->capture_default_str();
  app.add_flag("--kv-diagnostics", kv.diagnostics, "measure the exact attention mass served in 16-bit (slow)");
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(strfmt("%s: cannot open prompt file", path.c_str()));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw Error(strfmt("%s: error reading prompt file", path.c_str()));
  return ss.str();
}

bool stderr_is_terminal() { return isatty(STDERR_FILENO) == 1; }

}  // namespace spc::cli
