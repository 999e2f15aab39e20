// Small helpers shared by the report writers (bench CSV/JSON/SVG, eval CSV/heat maps).
#pragma once
#include <string>

namespace spc {

// %.{prec}g; empty for NaN and infinities (an empty CSV cell, no "nan" in the file).
std::string format_number(double v, int prec);
// The field as is, or quoted with inner quotes doubled when it holds a comma, quote or newline.
std::string csv_field(const std::string& s);
// &, <, > and " as XML entities (SVG text and attributes).
std::string xml_escape(const std::string& s);
// Writes content to path (truncating); spc::Error when the file cannot be opened or written.
void write_text_file(const std::string& path, const std::string& content);

}  // namespace spc
