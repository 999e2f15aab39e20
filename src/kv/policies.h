// Constructors of the individual policies (kv_policy.cpp's factory dispatches on the name).
#pragma once
#include <memory>

#include "kv/kv_policy.h"

namespace spc {
std::unique_ptr<KvPolicy> make_full_policy(const KvConfig& cfg, const KvGeometry& g);
// kivi, specache, specache-exact, topk-oracle
std::unique_ptr<KvPolicy> make_lowbit_policy(const KvConfig& cfg, const KvGeometry& g);
std::unique_ptr<KvPolicy> make_streaming_policy(const KvConfig& cfg, const KvGeometry& g);
}  // namespace spc
