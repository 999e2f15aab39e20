#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>

#include "engine/chat.h"
#include "engine/tokenizer.h"
#include "gguf/gguf.h"
#include "test_util.h"
#include "util/error.h"

using namespace spc;

namespace {

// Meta-Llama-3-8B-Instruct's template (hand-copied).
const char* kLlama3Template =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

// Qwen2-Instruct's template: the default system message is written with Jinja "\n" escapes.
const char* kQwen2Template =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if "
    "add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

// A ChatML template without a default system message.
const char* kPlainChatML =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

}  // namespace

TEST(Chat, SmolLM2TemplateFromModel) {
  const std::string path = default_model_path();
  SKIP_IF_MISSING(path);
  auto f = GgufFile::open(path);
  const auto tmpl = f->get_string("tokenizer.chat_template");
  ASSERT_TRUE(tmpl.has_value());
  EXPECT_EQ(detect_chat_family(*tmpl), ChatFamily::ChatML);
  EXPECT_EQ(chatml_default_system(*tmpl), "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  EXPECT_EQ(apply_chat_template(*tmpl, "Hi"),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(apply_chat_template(*tmpl, "What is 2+2?", "Be terse."),
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n");

  // The rendered prompt tokenizes with the markers as control tokens.
  auto tok = Tokenizer::from_gguf(*f);
  const auto ids = tok->encode(apply_chat_template(*tmpl, "Hi"), tok->add_bos_default(), true);
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 1), 3);  // <|im_start|> x3
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 2), 2);  // <|im_end|> x2
}

TEST(Chat, Llama3) {
  EXPECT_EQ(detect_chat_family(kLlama3Template), ChatFamily::Llama3);
  EXPECT_EQ(apply_chat_template(kLlama3Template, "Hello there"),
            "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  // Content is trimmed like the template's `| trim`.
  EXPECT_EQ(apply_chat_template(kLlama3Template, "  Hi\n", " You are a pirate. "),
            "<|start_header_id|>system<|end_header_id|>\n\nYou are a pirate.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

TEST(Chat, ChatMLVariants) {
  EXPECT_EQ(chatml_default_system(kQwen2Template), "You are a helpful assistant.");
  EXPECT_EQ(apply_chat_template(kQwen2Template, "Hi"),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(chatml_default_system(kPlainChatML), "");
  EXPECT_EQ(apply_chat_template(kPlainChatML, "Hi"), "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(apply_chat_template(kPlainChatML, "Hi", "Sys"),
            "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

TEST(Chat, Errors) {
  try {
    apply_chat_template("", "Hi");
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "model has no chat template");
  }
  try {
    apply_chat_template("{{ bos_token }}[INST] {{ message }} [/INST]", "Hi");
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "unsupported chat template (not ChatML or Llama-3 style)");
  }
}
