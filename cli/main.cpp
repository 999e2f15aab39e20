// specache: SpeCache inference engine command line.
#include <cstdio>
#include <exception>
#include <map>
#include <string>

#include "common.h"
#include "util/error.h"

int main(int argc, char** argv) {
  CLI::App app{"specache: long-context LLM generation with speculative KV caching (SpeCache) on GGUF models"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "specache 0.1.0");
  std::map<std::string, spc::cli::Runner> runners;
  runners["bench"] = spc::cli::add_bench(app);
  runners["generate"] = spc::cli::add_generate(app);
  runners["info"] = spc::cli::add_info(app);
  runners["tokenize"] = spc::cli::add_tokenize(app);
  runners["eval"] = spc::cli::add_eval(app);
  // CLI11 reports an unknown first word only as "A subcommand is required": name it instead.
  if (argc > 1 && argv[1][0] != '-' && runners.count(argv[1]) == 0) {
    std::fprintf(stderr, "specache: error: unknown subcommand '%s' (expected generate, info, tokenize, bench or eval; see --help)\n", argv[1]);
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    for (auto& [name, run] : runners)
      if (app.got_subcommand(name)) return run();
    return 2;
  } catch (const spc::Error& e) {
    std::fprintf(stderr, "specache: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "specache: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "specache: error: %s\n", e.what());
    return 1;
  }
}
