#include "util/text_out.h"

#include <cmath>
#include <cstdio>
#include <fstream>

#include "util/error.h"

namespace spc {

std::string format_number(double v, int prec) {
  if (!std::isfinite(v)) return "";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*g", prec, v);
  return buf;
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}

std::string xml_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

void write_text_file(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  SPC_CHECK(out.good(), "%s: cannot open for writing", path.c_str());
  out << content;
  out.close();
  SPC_CHECK(!out.fail(), "%s: error writing", path.c_str());
}

}  // namespace spc
