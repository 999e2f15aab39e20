// Prompt construction (passkey, needle in a haystack), policy specs and the streaming budget.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "engine/chat.h"
#include "eval/eval.h"
#include "util/error.h"

namespace spc::eval {

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size())) s.replace(p, from.size(), to);
  return s;
}

std::string trim(const std::string& s) {
  size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

// " " + answer as tokens following `prompt`: the tail of the whole text's tokenization when that
// starts with the prompt's own tokens (BPE merges may cross the boundary otherwise), else the
// continuation tokenized on its own.
std::vector<int32_t> continuation_tokens(const Tokenizer& tok, const std::string& text, const std::vector<int32_t>& prompt,
                                         const std::string& answer, bool parse_special) {
  const std::vector<int32_t> all = tok.encode(text + " " + answer, tok.add_bos_default(), parse_special);
  if (all.size() > prompt.size() && std::equal(prompt.begin(), prompt.end(), all.begin()))
    return {all.begin() + (ptrdiff_t)prompt.size(), all.end()};
  return tok.encode(" " + answer, false, false);
}

}  // namespace

// ---- policies -------------------------------------------------------------------------

std::vector<PolicySpec> parse_policies(const std::string& list, const KvConfig& base) {
  std::vector<PolicySpec> out;
  size_t start = 0;
  while (start <= list.size()) {
    size_t end = list.find(',', start);
    if (end == std::string::npos) end = list.size();
    const std::string item = trim(list.substr(start, end - start));
    start = end + 1;
    if (item.empty()) continue;
    PolicySpec p;
    p.label = item;
    p.kv = base;
    // Per-policy knobs after '/': "specache:1/debias=0.5/topk=128" (so one run can compare them).
    std::string head = item;
    const size_t slash = item.find('/');
    if (slash != std::string::npos) {
      head = item.substr(0, slash);
      size_t a = slash + 1;
      while (a <= item.size()) {
        size_t b = item.find('/', a);
        if (b == std::string::npos) b = item.size();
        const std::string kvp = item.substr(a, b - a);
        a = b + 1;
        const size_t eq = kvp.find('=');
        SPC_CHECK(eq != std::string::npos && eq > 0 && eq + 1 < kvp.size(), "policy '%s': expected /key=value, got '/%s'",
                  item.c_str(), kvp.c_str());
        const std::string key = kvp.substr(0, eq), val = kvp.substr(eq + 1);
        char* end = nullptr;
        const double x = std::strtod(val.c_str(), &end);
        SPC_CHECK(end && *end == '\0', "policy '%s': '%s' is not a number", item.c_str(), val.c_str());
        if (key == "debias") p.kv.debias = (float)x;
        else if (key == "predecode") {
          SPC_CHECK(x == 0 || x == 1, "policy '%s': predecode must be 1 (exact) or 0 (lowbit)", item.c_str());
          p.kv.predecode = x == 1 ? "exact" : "lowbit";
        }
        else if (key == "shift") p.kv.shift = (float)x;
        else if (key == "topk" || key == "window" || key == "group") {
          SPC_CHECK(x == std::floor(x) && x >= 0 && x <= (1 << 20), "policy '%s': %s must be a whole number", item.c_str(), key.c_str());
          (key == "topk" ? p.kv.topk : key == "window" ? p.kv.window : p.kv.group) = (int)x;
        } else
          throw Error(strfmt("policy '%s': unknown knob '%s' (known: debias, shift, topk, window, group, predecode)", item.c_str(), key.c_str()));
      }
    }
    const size_t colon = head.find(':');
    p.kv.policy = head.substr(0, colon);
    const auto& names = kv_policy_names();
    SPC_CHECK(std::find(names.begin(), names.end(), p.kv.policy) != names.end(), "unknown policy '%s' in --policies",
              p.kv.policy.c_str());
    if (colon != std::string::npos) {
      const std::string b = head.substr(colon + 1);
      SPC_CHECK(b == "1" || b == "2", "policy '%s': bits must be 1 or 2", item.c_str());
      p.kv.bits = b[0] - '0';
    }
    for (const auto& q : out) SPC_CHECK(q.label != p.label, "policy '%s' listed twice", p.label.c_str());
    out.push_back(p);
  }
  SPC_CHECK(!out.empty(), "--policies is empty");
  return out;
}

int64_t specache1_budget_positions(const KvConfig& base, int64_t n) {
  // Low-bit copy of K and V at 1 bit with an fp16 scale and zero per group of g: (1 + 32/g) bits per
  // element, i.e. (1 + 32/g)/16 of a 16-bit cache, plus the residual window and the top-k buffer.
  const double lowbit = (double)n * (1.0 + 32.0 / base.group) / 16.0;
  return (int64_t)std::ceil(lowbit) + base.window + base.topk;
}

KvConfig config_for_length(const PolicySpec& p, int64_t n) {
  KvConfig kv = resolve_kv_config(p.kv);
  if (kv.policy == "streaming") {
    const int64_t budget = specache1_budget_positions(p.kv, n);
    kv.sinks = 4;
    kv.window = (int)std::max<int64_t>(1, budget - 4);
  }
  return kv;
}

// ---- text ------------------------------------------------------------------------------

uint64_t case_seed(uint64_t seed, const std::string& task, int64_t length, int depth_index) {
  uint64_t h = splitmix64(seed);
  for (char c : task) h = splitmix64(h ^ (uint8_t)c);
  h = splitmix64(h ^ (uint64_t)length);
  return splitmix64(h ^ (uint64_t)(depth_index + 1) * 0x100000001b3ULL);
}

std::string gutenberg_body(const std::string& raw) {
  std::string s = raw;
  const size_t st = s.find("*** START OF");
  if (st != std::string::npos) {
    const size_t nl = s.find('\n', st);
    s = nl == std::string::npos ? "" : s.substr(nl + 1);
  }
  const size_t en = s.find("*** END OF");
  if (en != std::string::npos) s = s.substr(0, en);
  s = replace_all(s, "\r", "");
  // Paragraphs: runs of non-blank lines.
  std::vector<std::string> paras;
  std::string cur;
  size_t p = 0;
  while (p <= s.size()) {
    size_t e = s.find('\n', p);
    if (e == std::string::npos) e = s.size();
    const std::string line = trim(s.substr(p, e - p));
    p = e + 1;
    if (line.empty()) {
      if (!cur.empty()) paras.push_back(cur), cur.clear();
    } else {
      cur += (cur.empty() ? "" : " ") + line;
    }
  }
  if (!cur.empty()) paras.push_back(cur);
  size_t first = 0;
  while (first < paras.size() && paras[first].size() < 200) ++first;
  if (first == paras.size()) first = 0;
  std::string out;
  for (size_t i = first; i < paras.size(); ++i) out += (out.empty() ? "" : "\n\n") + paras[i];
  return out;
}

std::vector<int32_t> text_tokens(const Tokenizer& tok, const std::string& text, int64_t length) {
  size_t chars = (size_t)length * 6 + 256;
  std::vector<int32_t> out;
  for (;;) {
    out = tok.encode(text.substr(0, chars), tok.add_bos_default(), false);
    if ((int64_t)out.size() > length || chars >= text.size()) break;  // > : the cut token is complete
    chars *= 2;
  }
  SPC_CHECK((int64_t)out.size() >= length, "the text has only %zu tokens, fewer than %lld", out.size(), (long long)length);
  out.resize((size_t)length);
  return out;
}

bool score_contains(const std::string& output, const std::string& answer) {
  if (answer.empty()) return false;
  auto digit = [](char c) { return c >= '0' && c <= '9'; };
  for (size_t p = output.find(answer); p != std::string::npos; p = output.find(answer, p + 1)) {
    // A number must stand alone: "687171" does not contain the key 68717.
    const bool before_ok = !digit(answer.front()) || p == 0 || !digit(output[p - 1]);
    const size_t e = p + answer.size();
    const bool after_ok = !digit(answer.back()) || e == output.size() || !digit(output[e]);
    if (before_ok && after_ok) return true;
  }
  return false;
}

// ---- passkey ---------------------------------------------------------------------------

TaskPrompt make_passkey(const Tokenizer& tok, const PasskeyOptions& o) {
  static const std::string intro =
      "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
      "I will quiz you about the important info there.\n\n";
  static const std::string filler =
      "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
  static const std::string question = "\nWhat is the pass key? The pass key is";
  const uint64_t h = case_seed(o.seed, "passkey", o.length, o.depth_index);
  const std::string key = std::to_string(10000 + h % 90000);
  const std::string info = "The pass key is " + key + ". Remember it. " + key + " is the pass key. ";

  auto build = [&](int64_t reps) {
    const int64_t at = std::clamp<int64_t>((int64_t)std::llround(o.depth * (double)reps), 0, reps);
    std::string t = intro;
    for (int64_t i = 0; i < reps; ++i) {
      if (i == at) t += info;
      t += filler;
    }
    if (at == reps) t += info;
    return t + question;
  };
  auto count = [&](int64_t reps) { return (int64_t)tok.encode(build(reps), tok.add_bos_default(), false).size(); };

  const int64_t c0 = count(0), c10 = count(10);
  const double per = std::max(1.0, (double)(c10 - c0) / 10.0);
  int64_t reps = std::max<int64_t>(0, (int64_t)std::llround((double)(o.length - c0) / per));
  for (int it = 0; it < 4; ++it) {  // the slope is nearly exact; a few corrections at most
    const int64_t c = count(reps);
    const int64_t fix = (int64_t)std::llround((double)(o.length - c) / per);
    if (fix == 0) break;
    reps = std::max<int64_t>(0, reps + fix);
  }
  TaskPrompt p;
  p.text = build(reps);
  p.tokens = tok.encode(p.text, tok.add_bos_default(), false);
  p.answer = key;
  p.answer_tokens = continuation_tokens(tok, p.text, p.tokens, key, false);
  p.target = o.length;
  p.depth = o.depth;
  return p;
}

// ---- needle in a haystack --------------------------------------------------------------

TaskPrompt make_niah(const Tokenizer& tok, const std::string& haystack, const NiahOptions& o) {
  SPC_CHECK(o.needle.find("{N}") != std::string::npos, "--needle must contain {N} (where the answer goes)");
  SPC_CHECK(!haystack.empty(), "the haystack text is empty");
  uint64_t h = case_seed(o.seed, "niah", o.length, o.depth_index);
  std::string answer = std::to_string(1000 + h % 9000);
  while (haystack.find(answer) != std::string::npos) {  // the answer must come from the needle only
    h = splitmix64(h);
    answer = std::to_string(1000 + h % 9000);
  }
  const std::string needle = replace_all(o.needle, "{N}", answer);
  const bool chat = !o.chat_template.empty();

  auto build = [&](const std::string& hay) {
    const std::string user = hay + "\n\n" + o.question;
    if (chat) return apply_chat_template(o.chat_template, user) + o.answer_prefix;
    return user + "\n" + o.answer_prefix;
  };
  auto encode = [&](const std::string& t) { return tok.encode(t, tok.add_bos_default(), chat); };

  const int64_t overhead = (int64_t)encode(build(needle)).size();
  const int64_t want = std::max<int64_t>(0, o.length - overhead);

  // Tokenize enough of the haystack, cut to `want` tokens, back to text, end at a sentence.
  std::string hay;
  if (want > 0) {
    size_t chars = (size_t)want * 6 + 256;
    std::vector<int32_t> ht;
    for (;;) {
      ht = tok.encode(haystack.substr(0, chars), false, false);
      if ((int64_t)ht.size() >= want || chars >= haystack.size()) break;
      chars *= 2;
    }
    if ((int64_t)ht.size() > want) ht.resize((size_t)want);
    hay = tok.decode(ht);
    const size_t cut = hay.find_last_of('.');
    if (cut != std::string::npos && cut > hay.size() / 2) hay.resize(cut + 1);
  }

  // Needle at the first sentence boundary at or after depth * size.
  size_t at = (size_t)std::llround(std::clamp(o.depth, 0.0, 1.0) * (double)hay.size());
  if (at > 0 && at < hay.size()) {
    const size_t b = hay.find_first_of(".!?\n", at);
    at = b == std::string::npos ? hay.size() : b + 1;
  }
  at = std::min(at, hay.size());
  std::string with;
  if (at == 0) with = needle + " " + hay;
  else if (at >= hay.size()) with = hay + " " + needle;
  else with = hay.substr(0, at) + " " + needle + " " + hay.substr(at);

  TaskPrompt p;
  p.text = build(with);
  p.tokens = encode(p.text);
  p.answer = answer;
  p.answer_tokens = continuation_tokens(tok, p.text, p.tokens, answer, chat);
  p.target = o.length;
  p.depth = o.depth;
  return p;
}

}  // namespace spc::eval
