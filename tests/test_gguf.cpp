#include <gtest/gtest.h>

#include <filesystem>

#include "gguf/gguf.h"
#include "test_util.h"
#include "util/error.h"

using namespace spc;

TEST(Gguf, ParsesStories260K) {
  const std::string path = shared_path("models/stories260K/stories260K.gguf");
  SKIP_IF_MISSING(path);
  auto f = GgufFile::open(path);
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->tensors().size(), 48u);
  EXPECT_EQ(f->get_string("general.architecture").value(), "llama");
  EXPECT_EQ(f->get_string_array("tokenizer.ggml.tokens").size(), 512u);
  const GgufTensorInfo* t = f->find_tensor("token_embd.weight");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->ne[0], 64);
  EXPECT_EQ(t->ne[1], 512);
  EXPECT_EQ(t->type, GgmlType::F32);
}
