// End-to-end tests of the specache command line: runs the built binary as a subprocess and checks
// its stdout, stderr and exit status (info, tokenize, generate; bad input must fail cleanly).
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "ops/attention.h"
#include "ops/matmul.h"
#include "test_util.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string stories_path() { return shared_path("models/stories260K/stories260K.gguf"); }
std::string spm_vocab_path() { return shared_path("models/llama.cpp-vocab/ggml-vocab-llama-spm.gguf"); }

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

struct RunResult {
  int exit_code = -1;    // valid when !signaled
  bool signaled = false;
  int signal = 0;
  bool timed_out = false;
  std::string out, err;
  std::string describe() const {
    std::ostringstream s;
    s << "exit " << exit_code << (signaled ? " (signal " + std::to_string(signal) + ")" : "")
      << (timed_out ? " (timed out)" : "") << "\n--- stdout ---\n" << out.substr(0, 2000) << "\n--- stderr ---\n"
      << err.substr(0, 2000);
    return s.str();
  }
};

// Runs `specache args...` with stdin from /dev/null and stdout/stderr captured in temporary files.
RunResult run_cli(const std::vector<std::string>& args, int timeout_s = 120) {
  static int counter = 0;
  const fs::path dir = fs::temp_directory_path();
  const std::string tag = "specache_cli_" + std::to_string(getpid()) + "_" + std::to_string(counter++);
  const std::string out_path = (dir / (tag + ".out")).string(), err_path = (dir / (tag + ".err")).string();
  std::vector<std::string> argv_s{SPECACHE_CLI_PATH};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);

  RunResult r;
  const pid_t pid = fork();
  if (pid < 0) {
    ADD_FAILURE() << "fork failed";
    return r;
  }
  if (pid == 0) {
    const int in = open("/dev/null", O_RDONLY);
    const int out = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    const int err = open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (in < 0 || out < 0 || err < 0) _exit(126);
    dup2(in, 0);
    dup2(out, 1);
    dup2(err, 2);
    execv(argv[0], argv.data());
    _exit(127);
  }
  int status = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  for (;;) {
    const pid_t w = waitpid(pid, &status, WNOHANG);
    if (w == pid) break;
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      r.timed_out = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) {
    r.signaled = true;
    r.signal = WTERMSIG(status);
  }
  r.out = read_all(out_path);
  r.err = read_all(err_path);
  fs::remove(out_path);
  fs::remove(err_path);
  return r;
}

// Checks shared by every run: it finished by itself, no signal, no sanitizer report.
void expect_clean_exit(const RunResult& r) {
  EXPECT_FALSE(r.timed_out) << r.describe();
  EXPECT_FALSE(r.signaled) << r.describe();
  EXPECT_EQ(r.err.find("Sanitizer"), std::string::npos) << r.describe();
  EXPECT_EQ(r.err.find("runtime error:"), std::string::npos) << r.describe();
}

void expect_success(const RunResult& r) {
  expect_clean_exit(r);
  EXPECT_EQ(r.exit_code, 0) << r.describe();
}

// Non-zero exit, no crash, stderr mentions `keyword`, and stdout carries nothing.
void expect_failure(const RunResult& r, const std::string& keyword) {
  expect_clean_exit(r);
  EXPECT_NE(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.err.find(keyword), std::string::npos) << "stderr should mention '" << keyword << "'\n" << r.describe();
  EXPECT_TRUE(r.out.empty()) << r.describe();
}

// Scratch directory per test.
class CliTemp {
 public:
  CliTemp() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("specache_cli_" + std::to_string(getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  ~CliTemp() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string file(const std::string& name) const { return (dir_ / name).string(); }
  std::string write(const std::string& name, const std::string& bytes) const {
    const std::string p = file(name);
    std::ofstream(p, std::ios::binary) << bytes;
    return p;
  }

 private:
  fs::path dir_;
};

// `generate` on stories260K with one thread (fast and deterministic on a busy machine).
std::vector<std::string> gen_args(std::vector<std::string> extra) {
  std::vector<std::string> a{"generate", "-m", stories_path(), "-t", "1"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

json parse_single_json(const RunResult& r) {
  // Exactly one line on stdout, and it is one JSON object.
  EXPECT_FALSE(r.out.empty()) << r.describe();
  EXPECT_EQ(r.out.find('\n'), r.out.size() - 1) << "stdout should be one line\n" << r.describe();
  json j;
  try {
    j = json::parse(r.out);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "stdout is not valid JSON: " << e.what() << "\n" << r.describe();
  }
  EXPECT_TRUE(j.is_object()) << r.out;
  return j;
}

std::vector<int> json_tokens(const RunResult& r) {
  const json j = parse_single_json(r);
  if (!j.contains("tokens")) return {};
  return j["tokens"].get<std::vector<int>>();
}

const std::string kLongPrompt =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends "
    "and her dog. One day, she saw a big red ball under a tree and ran to get it.";

}  // namespace

// ---- info ---------------------------------------------------------------------------------------------

TEST(Cli, InfoPrintsTheArchitecture) {
  SKIP_IF_MISSING(stories_path());
  const RunResult r = run_cli({"info", "-m", stories_path()});
  expect_success(r);
  EXPECT_NE(r.out.find("architecture:   llama"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("layers:         5"), std::string::npos) << r.out;
}

TEST(Cli, InfoJsonHasHyperParameters) {
  SKIP_IF_MISSING(stories_path());
  const RunResult r = run_cli({"info", "-m", stories_path(), "--json"});
  expect_success(r);
  json j;
  ASSERT_NO_THROW(j = json::parse(r.out)) << r.out;
  EXPECT_EQ(j["architecture"], "llama");
  EXPECT_EQ(j["gguf_version"], 3);
  ASSERT_TRUE(j["hparams"].is_object()) << r.out;
  const json& h = j["hparams"];
  EXPECT_EQ(h["n_vocab"], 512);
  EXPECT_EQ(h["n_embd"], 64);
  EXPECT_EQ(h["n_layer"], 5);
  EXPECT_EQ(h["n_head"], 8);
  EXPECT_EQ(h["n_head_kv"], 4);
  EXPECT_EQ(h["head_dim"], 8);
  EXPECT_EQ(h["n_ff"], 172);
  EXPECT_EQ(h["n_ctx_train"], 2048);
  EXPECT_EQ(j["tokenizer"]["bos"], 1);
  EXPECT_EQ(j["tensor_types"]["F32"]["count"], 48);
}

// ---- tokenize -----------------------------------------------------------------------------------------

TEST(Cli, TokenizeJsonMatchesTheSpmTestVectors) {
  SKIP_IF_MISSING(spm_vocab_path());
  // The expected ids of "Hello world" from llama.cpp's test vectors (.out has no BOS; the vocabulary adds one).
  const std::string inp = read_all(spm_vocab_path() + ".inp");
  std::ifstream out(spm_vocab_path() + ".out");
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  for (size_t pos = 0, next; (next = inp.find(sep, pos)) != std::string::npos; pos = next + sep.size())
    texts.push_back(inp.substr(pos, next - pos));
  std::vector<int> expected;
  std::string line;
  for (size_t i = 0; std::getline(out, line); ++i)
    if (i < texts.size() && texts[i] == "Hello world") {
      std::istringstream ls(line);
      for (int id; ls >> id;) expected.push_back(id);
    }
  ASSERT_EQ(expected, (std::vector<int>{15043, 3186}));
  expected.insert(expected.begin(), 1);  // BOS

  RunResult r = run_cli({"tokenize", "-m", spm_vocab_path(), "-p", "Hello world", "--json"});
  expect_success(r);
  json j;
  ASSERT_NO_THROW(j = json::parse(r.out)) << r.out;
  EXPECT_EQ(j, json({{"tokens", expected}}));

  r = run_cli({"tokenize", "-m", spm_vocab_path(), "-p", "Hello world", "--json", "--no-bos"});
  expect_success(r);
  EXPECT_EQ(json::parse(r.out)["tokens"], json(std::vector<int>{15043, 3186}));
}

// ---- generate -----------------------------------------------------------------------------------------

TEST(Cli, GenerateJsonIsOneObjectWithTheDocumentedKeys) {
  SKIP_IF_MISSING(stories_path());
  const RunResult r = run_cli(gen_args({"-p", "", "-n", "20", "--json", "--temp", "0"}));
  expect_success(r);
  const json j = parse_single_json(r);
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j["prompt_tokens"], json(std::vector<int>{1})) << "an empty prompt is BOS alone";
  ASSERT_TRUE(j["tokens"].is_array());
  const auto toks = j["tokens"].get<std::vector<int>>();
  if (toks.size() != 20u) {
    ASSERT_LT(toks.size(), 20u);
    EXPECT_EQ(toks.back(), 2) << "fewer than -n tokens only when stopped at EOS";
  }
  for (int t : toks) EXPECT_TRUE(t >= 0 && t < 512) << t;
  ASSERT_TRUE(j["text"].is_string());
  EXPECT_NE(j["text"].get<std::string>().find("Once upon a time"), std::string::npos) << j["text"];
  const json& t = j["timings"];
  for (const char* k : {"prefill_ms", "prefill_tok_per_s", "decode_ms_per_token", "decode_tok_per_s"}) {
    ASSERT_TRUE(t.contains(k)) << k;
    EXPECT_TRUE(t[k].is_number()) << k;
    EXPECT_GE(t[k].get<double>(), 0.0) << k;
  }
  // The decode phases: parts of each step, so their sum stays within the per-token time.
  ASSERT_TRUE(t.contains("decode_phases_ms_per_token")) << t;
  double phase_sum = 0;
  for (const char* k : {"qkv", "attend", "wo", "ffn", "end_step", "output"}) {
    const json& ph = t["decode_phases_ms_per_token"];
    ASSERT_TRUE(ph.contains(k) && ph[k].is_number()) << k;
    EXPECT_GE(ph[k].get<double>(), 0.0) << k;
    phase_sum += ph[k].get<double>();
  }
  EXPECT_GT(phase_sum, 0.0);
  EXPECT_LE(phase_sum, t["decode_ms_per_token"].get<double>() * (1 + 1e-9));
  const json& kv = j["kv"];
  EXPECT_EQ(kv["policy"], "full");
  ASSERT_TRUE(kv["fast_bytes"].is_number()) << kv;
  EXPECT_GT(kv["fast_bytes"].get<double>(), 0);
  ASSERT_TRUE(kv["slow_bytes"].is_number()) << kv;
  EXPECT_GE(kv["slow_bytes"].get<double>(), 0);
}

// --act auto (the default) picks int8 only where SIMD int8 kernels serve the model's matrices:
// never for stories260K's F32 weights; for SmolLM2's Q4_1 exactly when the build has them. The
// prompt's activations (--prefill-act) are recorded beside the decode ones.
TEST(Cli, DecodeActivationsAreChosenAndRecorded) {
  SKIP_IF_MISSING(stories_path());
  auto act_of = [](const RunResult& r) { return parse_single_json(r)["timings"]["decode_act"].get<std::string>(); };
  RunResult r = run_cli(gen_args({"-p", "Once", "-n", "4", "--json", "--temp", "0"}));
  expect_success(r);
  EXPECT_EQ(act_of(r), "fp32");
  for (const char* flag : {"--int8-act", "--act=int8"}) {
    r = run_cli(gen_args({"-p", "Once", "-n", "4", "--json", "--temp", "0", flag}));
    expect_success(r);
    EXPECT_EQ(act_of(r), "int8") << flag;
    // F32 weights have no interleaved copies: the prompt stays fp32.
    EXPECT_EQ(parse_single_json(r)["timings"]["prefill_act"], "fp32") << flag;
  }
  expect_failure(run_cli(gen_args({"-p", "Once", "--act", "int4"})), "act");
  expect_failure(run_cli(gen_args({"-p", "Once", "--act", "fp32", "--int8-act"})), "int8-act");

  const std::string smol = default_model_path();
  if (!fs::exists(smol)) GTEST_SKIP() << "no " << smol << ": the auto choice on Q4_1 is not checked";
  auto smol_args = [&](const char* act) {
    return std::vector<std::string>{"generate", "-m", smol, "-t", "2", "-p", "The capital of France is",
                                    "-n", "1", "--json", "--act", act};
  };
  const RunResult a = run_cli(smol_args("auto")), i = run_cli(smol_args("int8")), f = run_cli(smol_args("fp32"));
  expect_success(a);
  expect_success(i);
  expect_success(f);
  EXPECT_EQ(act_of(i), "int8");
  EXPECT_EQ(act_of(f), "fp32");
  const bool have_kernels = spc::has_int8_decode_kernel(spc::GgmlType::Q4_1);
  EXPECT_EQ(act_of(a), have_kernels ? "int8" : "fp32");

  // Prefill follows int8 decode where the interleaved kernels serve every matrix (AVX-512 VNNI
  // builds: i8x8_bytes > 0), unless --prefill-act fp32; never without int8 decode.
  auto prefill_of = [](const RunResult& r) { return parse_single_json(r)["timings"]["prefill_act"].get<std::string>(); };
  const bool interleaved = spc::i8x8_bytes(spc::WeightView{spc::GgmlType::Q4_1, 64, 8, nullptr}) > 0;
  EXPECT_EQ(prefill_of(a), interleaved ? "int8" : "fp32");
  EXPECT_EQ(prefill_of(i), interleaved ? "int8" : "fp32");
  EXPECT_EQ(prefill_of(f), "fp32");
  auto args = smol_args("auto");
  args.insert(args.end(), {"--prefill-act", "fp32"});
  const RunResult p = run_cli(args);
  expect_success(p);
  EXPECT_EQ(act_of(p), act_of(a));
  EXPECT_EQ(prefill_of(p), "fp32");
  expect_failure(run_cli(gen_args({"-p", "Once", "--prefill-act", "int4"})), "prefill-act");
}

// --prefill-attn: auto picks bf16 exactly where the build has the kernels; fp32 is always there;
// int8 or bf16 where the build lacks them is a clear error, not a silent fallback.
TEST(Cli, PrefillAttentionIsChosenAndRecorded) {
  SKIP_IF_MISSING(stories_path());
  auto attn_of = [](const RunResult& r) { return parse_single_json(r)["timings"]["prefill_attn"].get<std::string>(); };
  const bool have = spc::attention_prefill_bf16_supported(spc::AttnShape{8, 4, 8});  // stories260K
  RunResult r = run_cli(gen_args({"-p", "Once upon a time", "-n", "4", "--json", "--temp", "0"}));
  expect_success(r);
  EXPECT_EQ(attn_of(r), have ? "bf16" : "fp32");
  r = run_cli(gen_args({"-p", "Once upon a time", "-n", "4", "--json", "--temp", "0", "--prefill-attn", "fp32"}));
  expect_success(r);
  EXPECT_EQ(attn_of(r), "fp32");
  for (const char* a : {"bf16", "int8"}) {
    r = run_cli(gen_args({"-p", "Once upon a time", "-n", "4", "--json", "--temp", "0", "--prefill-attn", a}));
    if (have) {
      expect_success(r);
      EXPECT_EQ(attn_of(r), a);
    } else {
      expect_failure(r, "AVX-512 BF16");
    }
  }
  expect_failure(run_cli(gen_args({"-p", "Once", "--prefill-attn", "fp16"})), "prefill-attn");
  // stories260K's head_dim 8 is no AMX tile shape, whatever the CPU: a clear error.
  expect_failure(run_cli(gen_args({"-p", "Once", "--prefill-attn", "amx"})), "AMX-BF16");
}

TEST(Cli, GreedyGenerationIsRepeatable) {
  SKIP_IF_MISSING(stories_path());
  const auto args = gen_args({"-p", "", "-n", "20", "--json", "--temp", "0"});
  const RunResult a = run_cli(args), b = run_cli(args);
  expect_success(a);
  expect_success(b);
  const auto ta = json_tokens(a);
  EXPECT_FALSE(ta.empty());
  EXPECT_EQ(ta, json_tokens(b));
}

TEST(Cli, SampledGenerationDependsOnlyOnTheSeed) {
  SKIP_IF_MISSING(stories_path());
  auto sample = [](const std::string& seed) {
    const RunResult r = run_cli(gen_args({"-p", "Once upon a time", "-n", "24", "--json", "--temp", "0.8", "--seed", seed}));
    expect_success(r);
    return json_tokens(r);
  };
  const auto s7 = sample("7");
  ASSERT_FALSE(s7.empty());
  EXPECT_EQ(s7, sample("7"));
  int differ = 0;
  for (const char* seed : {"1", "2", "3"}) differ += sample(seed) != s7;
  EXPECT_GE(differ, 1) << "three other seeds all reproduced seed 7's sample";
}

// Several -p: the prompts generate together (one batched decode step for all), each with its own
// cache; greedily each gets the tokens it gets alone, under a speculative policy too, and a
// sampled sequence i draws from seed + i.
TEST(Cli, SeveralPromptsGenerateTogetherAsTheyWouldAlone) {
  SKIP_IF_MISSING(stories_path());
  const std::vector<std::string> texts = {"Once upon a time", "Lily saw a big dog", "The sun"};
  for (const char* kv : {"full", "specache"}) {
    SCOPED_TRACE(kv);
    std::vector<std::string> args = {"-n", "16", "--json", "--temp", "0", "--kv", kv};
    if (std::string(kv) == "specache") args.insert(args.end(), {"--kv-topk", "4", "--kv-window", "4", "--kv-group", "32"});
    std::vector<std::string> batch_args = args;
    for (const auto& t : texts) batch_args.insert(batch_args.end(), {"-p", t});
    const RunResult b = run_cli(gen_args(batch_args));
    expect_success(b);
    const json j = parse_single_json(b);
    EXPECT_EQ(j["batch"].get<int>(), 3);
    ASSERT_EQ(j["results"].size(), 3u);
    int64_t decoded = 0;
    for (size_t i = 0; i < texts.size(); ++i) {
      std::vector<std::string> one = args;
      one.insert(one.end(), {"-p", texts[i]});
      const RunResult r = run_cli(gen_args(one));
      expect_success(r);
      const json ji = parse_single_json(r);
      const json& ri = j["results"][i];
      EXPECT_EQ(ri["source"], "prompt " + std::to_string(i + 1));
      EXPECT_EQ(ri["prompt_tokens"], ji["prompt_tokens"]);
      EXPECT_EQ(ri["tokens"], ji["tokens"]) << texts[i];
      EXPECT_EQ(ri["text"], ji["text"]);
      EXPECT_EQ(ri["kv"]["fast_bytes"], ji["kv"]["fast_bytes"]);
      decoded += (int64_t)ri["tokens"].size() - (ri["stopped_at_eos"].get<bool>() ? 0 : 1);
    }
    EXPECT_EQ(j["timings"]["decode_tokens"].get<int64_t>(), decoded);
    EXPECT_GT(j["timings"]["decode_tok_per_s"].get<double>(), 0.0);
  }
  // Sampling: sequence 2 of a batch seeded 7 draws what a single run seeded 8 draws.
  const RunResult b = run_cli(gen_args({"-n", "12", "--json", "--temp", "0.9", "--seed", "7", "-p", "Once", "-p", "Once"}));
  const RunResult one = run_cli(gen_args({"-n", "12", "--json", "--temp", "0.9", "--seed", "8", "-p", "Once"}));
  expect_success(b);
  expect_success(one);
  EXPECT_EQ(parse_single_json(b)["results"][1]["tokens"], parse_single_json(one)["tokens"]);
  // The text form labels each sequence.
  const RunResult txt = run_cli(gen_args({"-n", "4", "--temp", "0", "-p", "Once", "-p", "The sun"}));
  expect_success(txt);
  EXPECT_NE(txt.out.find("=== 1/2: prompt 1 ==="), std::string::npos) << txt.out;
  EXPECT_NE(txt.out.find("=== 2/2: prompt 2 ==="), std::string::npos) << txt.out;
  EXPECT_NE(txt.err.find("2 sequences decoded together"), std::string::npos) << txt.err;
}

// Prompts that begin alike (questions about one text) prefill the shared beginning once and take
// it over in the others; the generations are those of separate runs.
TEST(Cli, PromptsSharingABeginningPrefillItOnce) {
  SKIP_IF_MISSING(stories_path());
  std::string doc;
  for (int i = 0; i < 12; ++i) doc += "Lily went to the park with her dog. They played with a red ball. ";
  const std::vector<std::string> texts = {doc + "Then Lily", doc + "The dog was", doc + "Then Lily"};
  for (const char* kv : {"full", "specache", "kivi"}) {
    SCOPED_TRACE(kv);
    std::vector<std::string> args = {"-n", "12", "--json", "--temp", "0", "--kv", kv};
    if (std::string(kv) != "full") args.insert(args.end(), {"--kv-window", "8", "--kv-group", "32"});
    if (std::string(kv) == "specache") args.insert(args.end(), {"--kv-topk", "8"});
    std::vector<std::string> batch_args = args;
    for (const auto& t : texts) batch_args.insert(batch_args.end(), {"-p", t});
    const RunResult b = run_cli(gen_args(batch_args));
    expect_success(b);
    const json j = parse_single_json(b);
    const size_t n0 = j["results"][0]["prompt_tokens"].size(), n1 = j["results"][1]["prompt_tokens"].size();
    ASSERT_GT(n0, 150u);
    const int64_t shared = j["timings"]["prefill_shared_tokens"].get<int64_t>();
    if (std::string(kv) == "kivi") {
      EXPECT_EQ(shared, 0) << "kivi keeps no 16-bit copy to hand on";
    } else {
      // Prompt 2 takes prompt 1's beginning (all but its last tokens), prompt 3 all of prompt 1.
      EXPECT_GT(shared, (int64_t)(n0 + n1) - 12) << j["timings"];
      EXPECT_LE(shared, (int64_t)(n0 + n1));
    }
    EXPECT_EQ(j["timings"]["prefill_tokens"].get<int64_t>() + shared,
              (int64_t)(n0 + n1 + j["results"][2]["prompt_tokens"].size()));
    for (size_t i = 0; i < texts.size(); ++i) {
      std::vector<std::string> one = args;
      one.insert(one.end(), {"-p", texts[i]});
      const RunResult r = run_cli(gen_args(one));
      expect_success(r);
      EXPECT_EQ(j["results"][i]["tokens"], parse_single_json(r)["tokens"]) << texts[i];
    }
    // The shared beginning's cache is shared by default (held once); --no-kv-share copies it,
    // with the same tokens.
    batch_args.push_back("--no-kv-share");
    const RunResult c = run_cli(gen_args(batch_args));
    expect_success(c);
    const json jc = parse_single_json(c);
    const uint64_t held = j["kv"]["fast_bytes"].get<uint64_t>(), copied = jc["kv"]["fast_bytes"].get<uint64_t>();
    EXPECT_EQ(jc["kv"]["shared_bytes"].get<uint64_t>(), 0u);
    if (std::string(kv) == "kivi") {
      EXPECT_EQ(held, copied);
    } else {
      EXPECT_GT(j["kv"]["shared_bytes"].get<uint64_t>(), 0u);
      EXPECT_GT(j["results"][1]["kv"]["shared_bytes"].get<uint64_t>(), 0u);
      EXPECT_LT(held, copied);
    }
    for (size_t i = 0; i < texts.size(); ++i) EXPECT_EQ(j["results"][i]["tokens"], jc["results"][i]["tokens"]);
  }
  expect_failure(run_cli(gen_args({"-p", "Lily", "--no-kv-share"})), "--no-kv-share");
}

TEST(Cli, StreamingPrintsTheTextOnStdout) {
  SKIP_IF_MISSING(stories_path());
  const RunResult js = run_cli(gen_args({"-p", "Once upon a time", "-n", "16", "--temp", "0", "--json"}));
  const RunResult st = run_cli(gen_args({"-p", "Once upon a time", "-n", "16", "--temp", "0"}));
  expect_success(js);
  expect_success(st);
  const std::string text = parse_single_json(js)["text"].get<std::string>();
  ASSERT_FALSE(text.empty());
  EXPECT_EQ(st.out, text + "\n");
  EXPECT_EQ(st.out.find('{'), std::string::npos) << st.out;
  EXPECT_NE(st.err.find("prefill"), std::string::npos) << "statistics go to stderr\n" << st.describe();
}

TEST(Cli, ContextBeyondTrainingWarnsAndStillWorks) {
  SKIP_IF_MISSING(stories_path());
  const RunResult r = run_cli(gen_args({"-p", "Once", "-n", "8", "--temp", "0", "-c", "4096", "--json"}));
  expect_success(r);
  EXPECT_NE(r.err.find("warning"), std::string::npos) << r.describe();
  EXPECT_NE(r.err.find("2048"), std::string::npos) << r.describe();
  EXPECT_FALSE(json_tokens(r).empty());
}

TEST(Cli, MoreThreadsThanTheMachineHasWarnsAndStillWorks) {
  SKIP_IF_MISSING(stories_path());
  const unsigned hc = std::thread::hardware_concurrency();
  if (hc == 0) GTEST_SKIP() << "hardware_concurrency() unknown here";
  auto args = [&](unsigned t) {
    return std::vector<std::string>{"generate", "-m", stories_path(), "-t", std::to_string(t),
                                    "-p", "Once", "-n", "4", "--temp", "0", "--json"};
  };
  const RunResult over = run_cli(args(hc + 1));
  expect_success(over);
  EXPECT_NE(over.err.find("hardware threads"), std::string::npos) << over.describe();
  EXPECT_FALSE(json_tokens(over).empty());
  const RunResult fit = run_cli(args(hc));
  expect_success(fit);
  EXPECT_EQ(fit.err.find("hardware threads"), std::string::npos) << fit.describe();
}

// ---- bad input ----------------------------------------------------------------------------------------

TEST(Cli, MissingOrUnusableModelFiles) {
  SKIP_IF_MISSING(stories_path());
  CliTemp tmp;
  const std::string missing = tmp.file("nope.gguf");
  RunResult r = run_cli({"generate", "-m", missing, "-p", "hi"});
  expect_failure(r, "cannot open");
  EXPECT_NE(r.err.find(missing), std::string::npos) << r.describe();

  // A truncated copy of stories260K (cut inside the tensor data, and inside the header).
  const std::string full = read_all(stories_path());
  for (size_t len : {full.size() / 2, (size_t)5000, (size_t)20}) {
    const std::string cut = tmp.write("cut" + std::to_string(len) + ".gguf", full.substr(0, len));
    r = run_cli({"generate", "-m", cut, "-p", "hi", "-n", "4"});
    expect_failure(r, cut);
    r = run_cli({"info", "-m", cut});
    expect_failure(r, cut);
  }
  // Corrupted header bytes (the tensor count made absurd).
  std::string bad = full;
  for (int k = 8; k < 16; ++k) bad[k] = '\xff';
  const std::string corrupt = tmp.write("corrupt.gguf", bad);
  expect_failure(run_cli({"generate", "-m", corrupt, "-p", "hi"}), "tensor count");

  const std::string text = tmp.write("model.txt", "just some text, not a model\n");
  r = run_cli({"generate", "-m", text, "-p", "hi"});
  expect_failure(r, "not a GGUF file");
  expect_failure(run_cli({"info", "-m", text}), "not a GGUF file");
  expect_failure(run_cli({"tokenize", "-m", text, "-p", "hi"}), "not a GGUF file");
  expect_failure(run_cli({"generate", "-m", tmp.file(""), "-p", "hi"}), "not a regular file");
}

TEST(Cli, BadFlagsFailWithAMessage) {
  SKIP_IF_MISSING(stories_path());
  expect_failure(run_cli(gen_args({"--bogus-flag"})), "bogus-flag");
  expect_failure(run_cli({"generate", "-p", "hi"}), "--model is required");
  expect_failure(run_cli({"info"}), "--model is required");
  expect_failure(run_cli({}), "subcommand");
  expect_failure(run_cli({"frobnicate"}), "frobnicate");
  expect_failure(run_cli(gen_args({"-n", "abc"})), "abc");
  expect_failure(run_cli(gen_args({"-c", "-5"})), "ctx-size");
  expect_failure(run_cli(gen_args({"--temp", "warm"})), "temp");
  expect_failure(run_cli(gen_args({"--kv", "nonsense"})), "nonsense");
  expect_failure(run_cli(gen_args({"--kv-bits", "3"})), "kv-bits");
  expect_failure(run_cli(gen_args({"--kv-store", "tape"})), "kv-store");
  // A file store needs a directory; tiered flags with --kv full are inconsistent, not silently ignored.
  expect_failure(run_cli(gen_args({"--kv", "specache", "--kv-store", "file", "-p", "hi"})), "--kv-dir");
  expect_failure(run_cli(gen_args({"--kv-store", "file", "-p", "hi"})), "--kv-store");
  expect_failure(run_cli(gen_args({"--kv-bits", "1", "--kv", "full", "-p", "hi"})), "--kv-bits");
  expect_failure(run_cli(gen_args({"--kv-topk", "8", "-p", "hi"})), "--kv-topk");
  expect_failure(run_cli(gen_args({"--kv-guess", "draft", "--kv", "specache", "-p", "hi"})), "kv-guess");
  expect_failure(run_cli(gen_args({"--kv-guess", "model", "--kv", "specache-exact", "-p", "hi"})), "--kv-guess");
  expect_failure(run_cli(gen_args({"--kv-predecode", "oracle", "--kv", "specache", "-p", "hi"})), "kv-predecode");
  expect_failure(run_cli(gen_args({"--kv-predecode", "lowbit", "--kv", "specache-exact", "-p", "hi"})), "--kv-predecode");
  expect_failure(run_cli(gen_args({"--kv-copy", "gpu", "--kv", "specache", "-p", "hi"})), "kv-copy");
  expect_failure(run_cli(gen_args({"--kv-copy", "pool", "--kv", "full", "-p", "hi"})), "--kv-copy");
  expect_failure(run_cli(gen_args({"--kv-shift", "0", "--kv", "kivi", "-p", "hi"})), "--kv-shift");
  expect_failure(run_cli(gen_args({"--kv-debias", "0.5", "--kv", "full", "-p", "hi"})), "--kv-debias");
  expect_failure(run_cli(gen_args({"--kv-debias", "-1", "--kv", "specache", "-p", "hi"})), "kv-debias");
  const std::vector<std::string> bench = {"bench", "-m", stories_path(), "--depths", "16", "--gen", "3"};
  auto bench_args = [&](std::vector<std::string> extra) {
    std::vector<std::string> a = bench;
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  };
  expect_failure(run_cli(bench_args({"--batch", "0"})), "--batch");
  expect_failure(run_cli(bench_args({"--batch", "2,x"})), "--batch");
  expect_failure(run_cli(bench_args({"--batch", "1000"})), "--batch");
  expect_failure(run_cli(bench_args({"--batch", "2", "--interleave"})), "--interleave");
  expect_failure(run_cli(bench_args({"--batch-share"})), "--batch-share");
  // eval: a bad task or a missing haystack text is reported before the model loads (the model path
  // does not exist, so a later check would report that instead).
  CliTemp tmp;
  const std::string no_model = tmp.file("nope.gguf"), no_text = tmp.file("no_text.txt");
  expect_failure(run_cli({"eval", "-m", no_model, "--tasks", "passkey,frob"}), "unknown task 'frob'");
  RunResult r = run_cli({"eval", "-m", no_model, "--tasks", "ppl", "--haystack", no_text});
  expect_failure(r, "--haystack");
  EXPECT_NE(r.err.find(no_text), std::string::npos) << r.describe();
}

TEST(Cli, BadPromptsFailWithAMessage) {
  SKIP_IF_MISSING(stories_path());
  CliTemp tmp;
  const std::string pf = tmp.write("prompt.txt", "Once upon a time");
  expect_failure(run_cli(gen_args({"-p", "hi", "-f", pf})), "not both");
  expect_failure(run_cli({"tokenize", "-m", stories_path(), "-p", "hi", "-f", pf}), "not both");
  const std::string missing = tmp.file("missing_prompt.txt");
  RunResult r = run_cli(gen_args({"-f", missing}));
  expect_failure(r, "cannot open prompt file");
  EXPECT_NE(r.err.find(missing), std::string::npos) << r.describe();
  r = run_cli(gen_args({"-c", "8", "-p", kLongPrompt, "-n", "4"}));
  expect_failure(r, "longer than the context");
  r = run_cli(gen_args({"--chat", "-p", "hi", "-n", "4"}));
  expect_failure(r, "chat template");
  // The prompt file works when it exists.
  r = run_cli(gen_args({"-f", pf, "-n", "4", "--temp", "0", "--json"}));
  expect_success(r);
  EXPECT_GT(parse_single_json(r)["prompt_tokens"].size(), 1u);
}
