// Policy specs ("name[:bits]"), integer lists, byte accounting and summary statistics.
#include <algorithm>
#include <cctype>
#include <cmath>

#include "bench/bench.h"
#include "kv/kv_policy.h"
#include "util/error.h"

namespace spc::bench {

namespace {

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t b = 0;
  while (true) {
    const size_t e = s.find(sep, b);
    out.push_back(s.substr(b, e == std::string::npos ? std::string::npos : e - b));
    if (e == std::string::npos) break;
    b = e + 1;
  }
  return out;
}

std::string trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace((unsigned char)s[b])) ++b;
  while (e > b && std::isspace((unsigned char)s[e - 1])) --e;
  return s.substr(b, e - b);
}

}  // namespace

PolicySpec parse_policy_spec(const std::string& raw) {
  const std::string s = trim(raw);
  PolicySpec spec;
  spec.text = s;
  const size_t colon = s.find(':');
  spec.policy = s.substr(0, colon);
  SPC_CHECK(!spec.policy.empty(), "policy spec '%s': expected name[:bits], e.g. full, specache:2", s.c_str());
  for (char c : spec.policy)
    SPC_CHECK(std::islower((unsigned char)c) || std::isdigit((unsigned char)c) || c == '-' || c == '_',
              "policy spec '%s': policy name '%s' may only contain a-z, 0-9, '-' and '_'", s.c_str(),
              spec.policy.c_str());
  if (colon != std::string::npos) {
    const std::string b = s.substr(colon + 1);
    SPC_CHECK(b == "1" || b == "2", "policy spec '%s': bits must be 1 or 2, got '%s'", s.c_str(), b.c_str());
    spec.bits = b[0] - '0';
    SPC_CHECK(spec.policy != "full" && spec.policy != "streaming",
              "policy spec '%s': %s keeps no low-bit copy, so it takes no :bits", s.c_str(), spec.policy.c_str());
  }
  return spec;
}

std::vector<PolicySpec> parse_policy_list(const std::string& s) {
  std::vector<PolicySpec> out;
  for (const std::string& item : split(s, ',')) {
    SPC_CHECK(!trim(item).empty(), "--policies '%s': empty item (expected name[:bits],name[:bits],...)", s.c_str());
    out.push_back(parse_policy_spec(item));
  }
  return out;
}

KvConfig apply_policy_spec(const KvConfig& defaults, const PolicySpec& spec) {
  KvConfig c = defaults;
  c.policy = spec.policy;
  if (spec.bits) c.bits = spec.bits;
  return c;
}

void validate_policy_specs(const std::vector<PolicySpec>& specs, const KvConfig& defaults) {
  SPC_CHECK(!specs.empty(), "no policies to benchmark");
  const KvGeometry g{1, 2, 1, 64, 4096};
  for (const auto& s : specs) {
    try {
      (void)make_kv_policy(apply_policy_spec(defaults, s), g);
    } catch (const Error& e) {
      throw Error(strfmt("policy spec '%s': %s", s.text.c_str(), e.what()));
    }
  }
}

std::vector<int64_t> parse_int_list(const std::string& s, const char* what) {
  std::vector<int64_t> out;
  for (const std::string& raw : split(s, ',')) {
    const std::string item = trim(raw);
    SPC_CHECK(!item.empty() && item.size() <= 12 &&
                  std::all_of(item.begin(), item.end(), [](char c) { return std::isdigit((unsigned char)c) != 0; }),
              "%s '%s': expected comma-separated positive integers", what, s.c_str());
    const int64_t v = std::stoll(item);
    SPC_CHECK(v > 0, "%s '%s': values must be positive", what, s.c_str());
    out.push_back(v);
  }
  return out;
}

TokenBytes token_bytes(uint64_t weight_bytes_per_token, const KvStats& at_depth, const KvStats& after_decode) {
  TokenBytes b;
  b.weights = weight_bytes_per_token;
  b.kv_fast = at_depth.fast_bytes + at_depth.shared_bytes;  // a shared prefix is read by every sequence
  b.kv_slow = after_decode.fetched_bytes_per_step;
  return b;
}

uint64_t full_kv_bytes(const KvGeometry& g, int64_t depth) {
  return (uint64_t)depth * (uint64_t)g.n_layer * (uint64_t)g.n_head_kv * (uint64_t)g.head_dim * 2u * 2u;
}

Spread summarize(std::vector<double> v) {
  Spread s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  auto q = [&](double p) {
    const double x = p * (double)(v.size() - 1);
    const size_t i = (size_t)std::floor(x);
    const size_t j = std::min(i + 1, v.size() - 1);
    return v[i] + (v[j] - v[i]) * (x - (double)i);
  };
  s.n = v.size();
  s.min = v.front();
  s.max = v.back();
  s.median = q(0.5);
  s.p25 = q(0.25);
  s.p75 = q(0.75);
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / (double)v.size();
  return s;
}

// Bits of the low-bit copy as the row reports them (0 where the policy has none).
int reported_bits(const KvConfig& c) { return kv_policy_has_lowbit_copy(c.policy) ? c.bits : 0; }

}  // namespace spc::bench
