// Chat prompt formatting without a Jinja engine: recognise the template family from the GGUF's
// tokenizer.chat_template text and emit what that template renders for [system?, user] with
// add_generation_prompt = true.
#pragma once
#include <string>

namespace spc {

enum class ChatFamily { ChatML, Llama3 };

// Throws spc::Error("model has no chat template") for an empty template and
// spc::Error("unsupported chat template (not ChatML or Llama-3 style)") otherwise.
ChatFamily detect_chat_family(const std::string& tmpl);

// For ChatML templates that insert a system message when the conversation has none (SmolLM2, Qwen2/2.5):
// that message, read from the template text; "" when the template has none.
std::string chatml_default_system(const std::string& tmpl);

// Wraps one user message (and an optional system message) in the template's format, ending with the
// assistant header.
//  ChatML:  [<|im_start|>system\n{system or template default}<|im_end|>\n]<|im_start|>user\n{user}<|im_end|>\n
//           <|im_start|>assistant\n
//  Llama-3: [<|start_header_id|>system<|end_header_id|>\n\n{trim(system)}<|eot_id|>]
//           <|start_header_id|>user<|end_header_id|>\n\n{trim(user)}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n
// The Llama-3 template starts with bos_token; like llama.cpp we leave BOS out of the text because the
// tokenizer adds it (encode with add_bos = add_bos_default()). Llama-3.1's dated default system preamble
// is not reproduced.
std::string apply_chat_template(const std::string& tmpl, const std::string& user, const std::string& system = "");

}  // namespace spc
