// Shared pieces of the specache subcommands.
#pragma once
#include <CLI/CLI.hpp>

#include <string>

#include "kv/kv_policy.h"

namespace spc::cli {

// Flags every model-running subcommand takes.
struct ModelArgs {
  std::string model;
  int threads = 0;  // 0: all hardware threads
  bool int8_act = false;  // --int8-act: decode matmuls with int8 activations
};
void add_model_flags(CLI::App& app, ModelArgs& a);
// --int8-act (decode matmuls with int8 activations), for subcommands that run decode steps.
void add_int8_act_flag(CLI::App& app, bool& on);
int resolve_threads(int requested);

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
