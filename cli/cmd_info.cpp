// specache info: architecture, hyper-parameters, tensor types and sizes of a GGUF model.
#include <cstdio>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "common.h"
#include "engine/tokenizer.h"
#include "model/model.h"

namespace spc::cli {

namespace {

struct InfoArgs {
  std::string model;
  bool json = false;
};

int run_info(const InfoArgs& a) {
  auto model = Model::load(a.model);
  const ModelConfig& c = model->config();
  const GgufFile& f = model->gguf();
  auto tok = Tokenizer::from_gguf(f);
  std::map<std::string, std::pair<int, uint64_t>> by_type;  // type -> (count, bytes)
  uint64_t n_params = 0;
  for (const auto& t : f.tensors()) {
    auto& e = by_type[type_name(t.type)];
    e.first += 1;
    e.second += t.nbytes;
    n_params += (uint64_t)t.n_elements();
  }
  const uint64_t kv_per_token = (uint64_t)c.n_layer * c.n_head_kv * c.head_dim * 2 * 2;
  if (a.json) {
    nlohmann::json j;
    j["file"] = a.model;
    j["gguf_version"] = f.version();
    j["file_bytes"] = f.file_size();
    j["name"] = f.get_string("general.name").value_or("");
    j["architecture"] = c.arch;
    j["n_params"] = n_params;
    j["hparams"] = {{"n_vocab", c.n_vocab}, {"n_embd", c.n_embd}, {"n_layer", c.n_layer}, {"n_head", c.n_head},
                    {"n_head_kv", c.n_head_kv}, {"head_dim", c.head_dim}, {"n_ff", c.n_ff},
                    {"n_ctx_train", c.n_ctx_train}, {"rope_freq_base", c.rope.freq_base},
                    {"rope_neox", c.rope.neox}, {"rms_eps", c.rms_eps}, {"tied_output", c.tied_output}};
    j["tokenizer"] = {{"model", tok->kind() == Tokenizer::Kind::SPM ? "llama" : "gpt2"}, {"pre", tok->pre()}, {"bos", tok->bos_id()}, {"eos", tok->eos_id()},
                      {"add_bos", tok->add_bos_default()}};
    for (const auto& [name, e] : by_type) j["tensor_types"][name] = {{"count", e.first}, {"bytes", e.second}};
    j["kv_bytes_per_token_f16"] = kv_per_token;
    j["weight_bytes_per_token"] = model->weight_bytes_per_token();
    std::puts(j.dump(2).c_str());
    return 0;
  }
  std::printf("file:           %s (GGUF v%u, %.1f MiB)\n", a.model.c_str(), f.version(), f.file_size() / 1048576.0);
  std::printf("name:           %s\n", f.get_string("general.name").value_or("?").c_str());
  std::printf("architecture:   %s\n", c.arch.c_str());
  std::printf("parameters:     %.1f M\n", n_params / 1e6);
  std::printf("vocab:          %d (%s tokenizer, pre '%s', bos %d, eos %d, add_bos %s)\n", c.n_vocab, tok->kind() == Tokenizer::Kind::SPM ? "SentencePiece" : "GPT-2 BPE",
              tok->pre().c_str(), tok->bos_id(), tok->eos_id(), tok->add_bos_default() ? "yes" : "no");
  std::printf("layers:         %d\n", c.n_layer);
  std::printf("embedding:      %d, FFN %d\n", c.n_embd, c.n_ff);
  std::printf("heads:          %d query, %d KV (GQA %d:1), head dim %d\n", c.n_head, c.n_head_kv, c.n_head / c.n_head_kv, c.head_dim);
  std::printf("context:        %lld trained\n", (long long)c.n_ctx_train);
  std::printf("rope:           base %g, %s, %d rotated dims%s\n", c.rope.freq_base, c.rope.neox ? "NeoX" : "normal",
              c.rope.n_rot, c.rope.freq_scale != 1 ? " (linear scaling)" : "");
  std::printf("output:         %s\n", c.tied_output ? "tied to token embedding" : "separate matrix");
  std::printf("tensor types:\n");
  for (const auto& [name, e] : by_type) std::printf("  %-6s %4d tensors  %9.2f MiB\n", name.c_str(), e.first, e.second / 1048576.0);
  std::printf("KV cache:       %.1f KiB per token at 16 bits (%.1f MiB at the trained context)\n", kv_per_token / 1024.0,
              kv_per_token * (double)c.n_ctx_train / 1048576.0);
  std::printf("weights read per decoded token: %.1f MiB\n", model->weight_bytes_per_token() / 1048576.0);
  return 0;
}

}  // namespace

Runner add_info(CLI::App& app) {
  auto a = std::make_shared<InfoArgs>();
  CLI::App* sub = app.add_subcommand("info", "show a GGUF model's architecture, hyper-parameters and tensors");
  sub->add_option("-m,--model", a->model, "GGUF model file")->required();
  sub->add_flag("--json", a->json, "print JSON");
  return [a] { return run_info(*a); };
}

}  // namespace spc::cli
