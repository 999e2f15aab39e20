#include "kv/kv_policy.h"

#include "kv/policies.h"
#include "util/error.h"

namespace spc {

const std::vector<std::string>& kv_policy_names() {
  static const std::vector<std::string> names = {"full", "kivi", "specache", "specache-refetch", "specache-exact", "streaming", "topk-oracle"};
  return names;
}

bool kv_policy_has_lowbit_copy(const std::string& p) {
  return p == "kivi" || p == "specache" || p == "specache-refetch" || p == "specache-exact" || p == "topk-oracle";
}

bool kv_policy_keeps_16bit_copy(const std::string& p) { return p != "kivi" && p != "streaming"; }

KvConfig resolve_kv_config(KvConfig cfg) {
  if (cfg.debias < 0.0f) cfg.debias = kv_policy_has_lowbit_copy(cfg.policy) ? 0.5f : 0.0f;
  return cfg;
}

std::unique_ptr<KvPolicy> make_kv_policy(const KvConfig& given, const KvGeometry& g) {
  const KvConfig cfg = resolve_kv_config(given);
  SPC_CHECK(g.n_layer > 0 && g.n_head_kv > 0 && g.n_head % g.n_head_kv == 0 && g.head_dim > 0 && g.n_ctx > 0,
            "invalid KV geometry");
  if (cfg.policy == "full") return make_full_policy(cfg, g);
  if (cfg.policy == "streaming") return make_streaming_policy(cfg, g);
  if (kv_policy_has_lowbit_copy(cfg.policy)) {
    SPC_CHECK(cfg.bits == 1 || cfg.bits == 2, "--kv-bits must be 1 or 2, got %d", cfg.bits);
    SPC_CHECK(cfg.group == 32 || cfg.group == 64, "--kv-group must be 32 or 64, got %d", cfg.group);
    SPC_CHECK(cfg.topk >= 0 && cfg.window >= 0, "--kv-topk and --kv-window must be >= 0");
    SPC_CHECK(cfg.shift >= 0.0f && cfg.shift <= 16.0f, "--kv-shift must be in [0, 16], got %g", (double)cfg.shift);
    SPC_CHECK(cfg.debias >= 0.0f && cfg.debias <= 4.0f, "--kv-debias must be in [0, 4], got %g", (double)cfg.debias);
    SPC_CHECK(cfg.guess == "lookup" || cfg.guess == "model", "--kv-guess must be lookup or model, got '%s'", cfg.guess.c_str());
    SPC_CHECK(cfg.predecode == "exact" || cfg.predecode == "lowbit", "--kv-predecode must be exact or lowbit, got '%s'",
              cfg.predecode.c_str());
    SPC_CHECK(cfg.store == "host" || cfg.store == "file", "--kv-store must be host or file, got '%s'", cfg.store.c_str());
    SPC_CHECK(cfg.store != "file" || !cfg.dir.empty(), "--kv-store file needs --kv-dir DIR");
    SPC_CHECK(cfg.copy == "auto" || cfg.copy == "thread" || cfg.copy == "pool",
              "--kv-copy must be auto, thread or pool, got '%s'", cfg.copy.c_str());
    return make_lowbit_policy(cfg, g);
  }
  std::string known;
  for (const auto& n : kv_policy_names()) known += (known.empty() ? "" : ", ") + n;
  throw Error(strfmt("unknown KV policy '%s' (expected one of: %s)", cfg.policy.c_str(), known.c_str()));
}

}  // namespace spc
