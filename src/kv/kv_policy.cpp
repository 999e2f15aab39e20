#include "kv/kv_policy.h"

#include "kv/policies.h"
#include "util/error.h"

namespace spc {

const std::vector<std::string>& kv_policy_names() {
  static const std::vector<std::string> names = {"full"};
  return names;
}

std::unique_ptr<KvPolicy> make_kv_policy(const KvConfig& cfg, const KvGeometry& g) {
  SPC_CHECK(g.n_layer > 0 && g.n_head_kv > 0 && g.n_head % g.n_head_kv == 0 && g.head_dim > 0 && g.n_ctx > 0,
            "invalid KV geometry");
  if (cfg.policy == "full") return make_full_policy(cfg, g);
  std::string known;
  for (const auto& n : kv_policy_names()) known += (known.empty() ? "" : ", ") + n;
  throw Error(strfmt("unknown KV policy '%s' (expected one of: %s)", cfg.policy.c_str(), known.c_str()));
}

}  // namespace spc
