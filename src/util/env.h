// Environment switches (SPECACHE_NO_AMX, SPECACHE_NO_HUGEPAGES, SPECACHE_NO_URING): a variable
// that is set, non-empty and not "0" is on.
#pragma once
#include <cstdlib>
#include <cstring>

namespace spc {

inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::strcmp(v, "0") != 0;
}

}  // namespace spc
