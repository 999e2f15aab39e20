// specache tokenize: text -> token ids with the model's own tokenizer.
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>

#include "common.h"
#include "engine/tokenizer.h"
#include "gguf/gguf.h"
#include "util/error.h"

namespace spc::cli {

namespace {

struct TokenizeArgs {
  std::string model, prompt, prompt_file;
  bool no_bos = false, json = false;
};

int run_tokenize(const CLI::App& app, const TokenizeArgs& a) {
  SPC_CHECK(!(app.count("--prompt") && app.count("--file")), "give either -p/--prompt or -f/--file, not both");
  const std::string text = a.prompt_file.empty() ? a.prompt : read_text_file(a.prompt_file);
  auto f = GgufFile::open(a.model);  // vocabulary-only GGUFs work too
  auto tok = Tokenizer::from_gguf(*f);
  const auto ids = tok->encode(text, tok->add_bos_default() && !a.no_bos, true);
  if (a.json) {
    std::puts(nlohmann::json{{"tokens", ids}}.dump().c_str());
    return 0;
  }
  for (int32_t id : ids) {
    const std::string piece = tok->token_to_piece(id);
    std::printf("%6d -> '%s'\n", id, piece.empty() ? tok->token_text(id).c_str() : piece.c_str());
  }
  return 0;
}

}  // namespace

Runner add_tokenize(CLI::App& app) {
  auto a = std::make_shared<TokenizeArgs>();
  CLI::App* sub = app.add_subcommand("tokenize", "show the token ids of a text");
  sub->add_option("-m,--model", a->model, "GGUF model (or vocabulary-only GGUF)")->required();
  sub->add_option("-p,--prompt", a->prompt, "text to tokenize");
  sub->add_option("-f,--file", a->prompt_file, "read the text from a file");
  sub->add_flag("--no-bos", a->no_bos, "do not add BOS even if the vocabulary asks for it");
  sub->add_flag("--json", a->json, "print {\"tokens\": [ids]}");
  return [sub, a] { return run_tokenize(*sub, *a); };
}

}  // namespace spc::cli
