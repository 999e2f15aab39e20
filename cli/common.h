// Shared pieces of the specache subcommands.
#pragma once
#include <CLI/CLI.hpp>

#include <string>

#include "kv/kv_policy.h"
#include "model/model.h"

namespace spc::cli {

// Activations of the matmuls: --act auto|int8|fp32 and --int8-act (= --act int8) for decode,
// --prefill-act auto|fp32 for the prompt.
struct ActArgs {
  std::string act = "auto";
  bool int8_flag = false;
  std::string prefill = "auto";
  std::string prefill_attn = "auto";
};
// Flags every model-running subcommand takes.
struct ModelArgs {
  std::string model;
  int threads = 0;  // 0: all hardware threads
  ActArgs act;
};
void add_model_flags(CLI::App& app, ModelArgs& a);
// --act, --int8-act, --prefill-act and --prefill-attn, for subcommands that run the model.
void add_act_flags(CLI::App& app, ActArgs& a);
// What apply_act chose: "int8" or "fp32" for decode and for prefill; "int8", "bf16" or "fp32" for
// the prompt's attention.
struct ActChoice {
  std::string decode, prefill, prefill_attn;
};
// Sets the model's activations from those flags. Decode, auto: int8 where the build has SIMD int8
// kernels for the model's quantized matrices (Model::int8_decode_supported), else fp32. Prefill,
// auto: int8 where Model::int8_prefill then holds (int8 decode over the interleaved copies).
// Prefill attention, auto: amx where the CPU has it, else bf16 where the build has the kernel
// (Model::prefill_attn_supported), else fp32; amx, int8 or bf16 where it is lacking is an
// spc::Error.
ActChoice apply_act(const ActArgs& a, Model& m);
int resolve_threads(int requested);
// A warning on stderr when `threads` exceeds the hardware threads (resolve_threads calls it).
void warn_oversubscribed(int threads);

// --kv* flags.
void add_kv_flags(CLI::App& app, KvConfig& kv);

// Reads a whole text file; spc::Error if missing/unreadable.
std::string read_text_file(const std::string& path);

bool stderr_is_terminal();

// Registration of the subcommands (each returns a function run after parsing).
using Runner = std::function<int()>;
Runner add_bench(CLI::App& app);
Runner add_generate(CLI::App& app);
Runner add_info(CLI::App& app);
Runner add_tokenize(CLI::App& app);
Runner add_eval(CLI::App& app);

}  // namespace spc::cli
