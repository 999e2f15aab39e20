// Error handling: one exception type at the library boundary, checks that stay on in release.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace spc {

// Thrown for bad input (files, flags, requests) and environment failures (I/O, disk full).
// The message is one line that says what was expected and what was found.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// printf-style formatting into a std::string.
std::string strfmt(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace spc

// Input validation: throws spc::Error with a formatted message. Always on.
#define SPC_CHECK(cond, ...)                                  \
  do {                                                        \
    if (!(cond)) throw ::spc::Error(::spc::strfmt(__VA_ARGS__)); \
  } while (0)

// Broken internal invariant: abort with file and line. Always on.
#define SPC_ASSERT(cond)                                                              \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "%s:%d: internal invariant failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                   \
    }                                                                                 \
  } while (0)
