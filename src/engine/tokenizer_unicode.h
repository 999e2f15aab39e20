// UTF-8 and GPT-2 byte-level helpers shared by the tokenizer implementation files.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace spc::tok {

// Length of the UTF-8 sequence announced by a lead byte, by its high nibble (continuation bytes count as 1;
// 0xF8..0xFF as 4, like llama.cpp). Callers clip to the remaining length.
inline size_t utf8_len(char c) {
  static constexpr uint8_t lut[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return lut[(uint8_t)c >> 4];
}

inline void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += (char)cp;
  } else if (cp < 0x800) {
    out += (char)(0xC0 | (cp >> 6));
    out += (char)(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += (char)(0xE0 | (cp >> 12));
    out += (char)(0x80 | ((cp >> 6) & 0x3F));
    out += (char)(0x80 | (cp & 0x3F));
  } else {
    out += (char)(0xF0 | (cp >> 18));
    out += (char)(0x80 | ((cp >> 12) & 0x3F));
    out += (char)(0x80 | ((cp >> 6) & 0x3F));
    out += (char)(0x80 | (cp & 0x3F));
  }
}

// Decodes one strictly valid UTF-8 sequence at s[i]; returns its length, or 0 when invalid
// (bad lead/continuation byte, overlong form, surrogate, > U+10FFFF, truncated).
size_t utf8_decode(std::string_view s, size_t i, uint32_t* cp);

// Replaces every byte that does not start a valid UTF-8 sequence with U+FFFD (as llama.cpp does
// before regex pre-tokenization).
std::string utf8_sanitize(std::string_view s);

// GPT-2 bytes_to_unicode: the code point that stands for byte b in byte-level BPE token text.
uint32_t byte_to_cp(uint8_t b);
// Inverse; -1 when cp is not the image of a byte.
int cp_to_byte(uint32_t cp);

}  // namespace spc::tok
