#include "engine/chat.h"

#include "util/error.h"

namespace spc {

namespace {

std::string trim(const std::string& s) {
  const char* ws = " \t\n\r\f\v";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  const size_t e = s.find_last_not_of(ws);
  return s.substr(b, e - b + 1);
}

}  // namespace

ChatFamily detect_chat_family(const std::string& tmpl) {
  if (tmpl.empty()) throw Error("model has no chat template");
  if (tmpl.find("<|im_start|>") != std::string::npos) return ChatFamily::ChatML;
  if (tmpl.find("<|start_header_id|>") != std::string::npos) return ChatFamily::Llama3;
  throw Error("unsupported chat template (not ChatML or Llama-3 style)");
}

std::string chatml_default_system(const std::string& tmpl) {
  // Look for a literal "<|im_start|>system" followed by a newline (a real one or the two-character escape
  // "\n" inside a Jinja string literal) and constant text up to "<|im_end|>". Occurrences followed by an
  // expression (quote, brace, '+') are where the template renders the caller's system message; skip them.
  const std::string head = "<|im_start|>system";
  for (size_t pos = tmpl.find(head); pos != std::string::npos; pos = tmpl.find(head, pos + 1)) {
    size_t p = pos + head.size();
    if (tmpl.compare(p, 1, "\n") == 0) p += 1;
    else if (tmpl.compare(p, 2, "\\n") == 0) p += 2;
    else continue;
    const size_t end = tmpl.find("<|im_end|>", p);
    if (end == std::string::npos) continue;
    const std::string body = tmpl.substr(p, end - p);
    if (body.empty() || body.find_first_of("'\"{}+") != std::string::npos) continue;
    std::string out;  // undo Jinja string escapes
    for (size_t i = 0; i < body.size(); ++i) {
      if (body[i] == '\\' && i + 1 < body.size()) {
        const char c = body[++i];
        out += c == 'n' ? '\n' : c == 't' ? '\t' : c;
      } else {
        out += body[i];
      }
    }
    return out;
  }
  return "";
}

std::string apply_chat_template(const std::string& tmpl, const std::string& user, const std::string& system) {
  switch (detect_chat_family(tmpl)) {
    case ChatFamily::ChatML: {
      std::string out;
      const std::string sys = system.empty() ? chatml_default_system(tmpl) : system;
      if (!sys.empty()) out += "<|im_start|>system\n" + sys + "<|im_end|>\n";
      out += "<|im_start|>user\n" + user + "<|im_end|>\n";
      out += "<|im_start|>assistant\n";
      return out;
    }
    case ChatFamily::Llama3: {
      std::string out;
      if (!system.empty())
        out += "<|start_header_id|>system<|end_header_id|>\n\n" + trim(system) + "<|eot_id|>";
      out += "<|start_header_id|>user<|end_header_id|>\n\n" + trim(user) + "<|eot_id|>";
      out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      return out;
    }
  }
  throw Error("unsupported chat template (not ChatML or Llama-3 style)");
}

}  // namespace spc
