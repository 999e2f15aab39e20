// Reports of an evaluation: markdown tables, CSV, JSON and hand-written SVG heat maps.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "eval/eval.h"
#include "util/error.h"
#include "util/text_out.h"

namespace spc::eval {

namespace {

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

double metric(const CaseResult& c, const char* k) {
  const auto it = c.metrics.find(k);
  return it == c.metrics.end() ? std::nan("") : it->second;
}

std::vector<std::string> policy_order(const std::vector<CaseResult>& r) {
  std::vector<std::string> out;
  for (const auto& c : r)
    if (std::find(out.begin(), out.end(), c.policy) == out.end()) out.push_back(c.policy);
  return out;
}

std::vector<int64_t> lengths_of(const std::vector<CaseResult>& r, const std::string& task) {
  std::set<int64_t> s;
  for (const auto& c : r)
    if (task.empty() || c.task == task) s.insert(c.length);
  return {s.begin(), s.end()};
}

std::vector<double> depths_of(const std::vector<CaseResult>& r, const std::string& task) {
  std::set<double> s;
  for (const auto& c : r)
    if (c.task == task) s.insert(c.depth);
  return {s.begin(), s.end()};
}

template <class F>
void each(const std::vector<CaseResult>& r, const std::string& task, const std::string& policy, int64_t L, F f) {
  for (const auto& c : r)
    if (c.task == task && c.policy == policy && c.length == L) f(c);
}

std::string num(double v) { return format_number(v, 9); }

}  // namespace

std::string markdown_report(const std::vector<CaseResult>& r, const EvalOptions& o) {
  std::ostringstream md;
  const auto policies = policy_order(r);
  for (const char* task : {"passkey", "niah"}) {
    const auto Ls = lengths_of(r, task);
    if (Ls.empty()) continue;
    // Cases per (policy, length, depth): one per seed.
    std::set<int64_t> seeds;
    for (const auto& c : r)
      if (c.task == task) seeds.insert(c.seed);
    const size_t ns = seeds.size();
    md << "### " << task << ": cases solved across depths" << (ns > 1 ? " and " + std::to_string(ns) + " seeds" : "")
       << "\n\n| policy |";
    for (auto L : Ls) md << " " << L << " |";
    md << "\n|---|";
    for (size_t i = 0; i < Ls.size(); ++i) md << "---|";
    md << "\n";
    for (const auto& p : policies) {
      md << "| " << p << " |";
      for (auto L : Ls) {
        int n = 0, ok = 0;
        each(r, task, p, L, [&](const CaseResult& c) { ++n, ok += c.score > 0; });
        md << " " << (n ? fmt("%.0f%%", 100.0 * ok / n) + " (" + std::to_string(ok) + "/" + std::to_string(n) + ")" : "-") << " |";
      }
      md << "\n";
    }
    // The heat map as text: one character per depth, in depth order (1 solved, 0 not; with
    // several seeds, how many of them were solved, up to 9).
    const auto Ds = depths_of(r, task);
    md << "\nPer depth (";
    for (size_t i = 0; i < Ds.size(); ++i) md << (i ? ", " : "") << fmt("%g", Ds[i]);
    md << (ns > 1 ? "; cases solved of " + std::to_string(ns) + " seeds):\n\n| policy |" : std::string("; 1 = solved):\n\n| policy |"));
    for (auto L : Ls) md << " " << L << " |";
    md << "\n|---|";
    for (size_t i = 0; i < Ls.size(); ++i) md << "---|";
    md << "\n";
    for (const auto& p : policies) {
      md << "| " << p << " |";
      for (auto L : Ls) {
        std::string cell;
        for (double d : Ds) {
          int n = 0, ok = 0;
          each(r, task, p, L, [&](const CaseResult& c) { if (c.depth == d) ++n, ok += c.score > 0; });
          if (ns > 1) cell += n == 0 ? '-' : ok <= 9 ? (char)('0' + ok) : '+';
          else cell += n == 0 ? "-" : ok == n ? "1" : ok == 0 ? "0" : "~";
        }
        md << " `" << cell << "` |";
      }
      md << "\n";
    }
    // The graded view: the answer teacher-forced after the prompt, mean over the depths.
    md << "\nAnswer tokens teacher-forced (mean over depths): share ranked first / mean NLL (nats):\n\n| policy |";
    for (auto L : Ls) md << " " << L << " |";
    md << "\n|---|";
    for (size_t i = 0; i < Ls.size(); ++i) md << "---|";
    md << "\n";
    for (const auto& p : policies) {
      md << "| " << p << " |";
      for (auto L : Ls) {
        int n = 0;
        double top1 = 0, nl = 0;
        each(r, task, p, L, [&](const CaseResult& c) {
          if (std::isnan(metric(c, "answer_top1"))) return;
          ++n, top1 += metric(c, "answer_top1"), nl += metric(c, "answer_nll");
        });
        md << " " << (n ? fmt("%.2f", top1 / n) + " / " + fmt("%.3f", nl / n) : "-") << " |";
      }
      md << "\n";
    }
    md << "\n";
  }
  if (!lengths_of(r, "ppl").empty()) {
    const auto Ls = lengths_of(r, "ppl");
    md << "### ppl: perplexity of the last " << o.ppl_tokens << " tokens (teacher-forced through each policy's decode path)\n\n| policy |";
    for (auto L : Ls) md << " " << L << " |";
    md << "\n|---|";
    for (size_t i = 0; i < Ls.size(); ++i) md << "---|";
    md << "\n";
    for (const auto& p : policies) {
      md << "| " << p << " |";
      for (auto L : Ls) {
        std::string cell = "-";
        each(r, "ppl", p, L, [&](const CaseResult& c) { cell = fmt("%.4f", c.score); });
        md << " " << cell << " |";
      }
      md << "\n";
    }
    md << "\n";
  }
  if (!lengths_of(r, "agree").empty()) {
    md << "### agree: " << o.agree_tokens
       << " tokens along full's greedy continuation (KL(full||policy), top-1) and free-running greedy agreement\n\n"
          "| length | policy | mean KL | max KL | top-1 | greedy prefix | greedy match |\n|---|---|---|---|---|---|---|\n";
    for (auto L : lengths_of(r, "agree"))
      for (const auto& p : policies)
        each(r, "agree", p, L, [&](const CaseResult& c) {
          md << "| " << L << " | " << p << " | " << fmt("%.5f", metric(c, "kl_mean")) << " | " << fmt("%.4f", metric(c, "kl_max"))
             << " | " << fmt("%.3f", metric(c, "top1")) << " | " << fmt("%.3f", metric(c, "greedy_prefix")) << " | "
             << fmt("%.3f", metric(c, "greedy_match")) << " |\n";
        });
    md << "\n";
  }
  // KV statistics, averaged over every case of a policy at a length.
  md << "### KV statistics (mean over the cases of each length; fast bytes relative to full)\n\n"
        "| length | policy | fast MiB | fast / full | spec recall | guess hits | prefetch reuse | fetched KiB/step | stall ms | decode ms/tok |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n";
  for (auto L : lengths_of(r, "")) {
    double full_fast = 0;
    int full_n = 0;
    for (const auto& c : r)
      if (c.length == L && c.kv.policy == "full") full_fast += (double)c.stats.fast_bytes, ++full_n;
    for (const auto& p : policies) {
      double fast = 0, recall = 0, reuse = 0, fetched = 0, stall = 0, ms = 0, hits = 0;
      int n = 0, n_hits = 0;
      for (const auto& c : r)
        if (c.length == L && c.policy == p) {
          if (c.metrics.count("guess_hit_rate")) hits += c.metrics.at("guess_hit_rate"), ++n_hits;
          fast += (double)c.stats.fast_bytes, recall += c.stats.spec_recall, reuse += c.stats.prefetch_reuse_rate;
          fetched += c.stats.fetched_bytes_per_step, stall += c.stats.stall_ms, ms += c.decode_ms_per_token, ++n;
        }
      if (!n) continue;
      const std::string ratio = full_n && full_fast > 0 ? fmt("%.1f%%", 100.0 * (fast / n) / (full_fast / full_n)) : "-";
      md << "| " << L << " | " << p << " | " << fmt("%.2f", fast / n / 1048576.0) << " | " << ratio << " | "
         << fmt("%.3f", recall / n) << " | " << (n_hits ? fmt("%.3f", hits / n_hits) : std::string("-")) << " | "
         << fmt("%.3f", reuse / n) << " | " << fmt("%.1f", fetched / n / 1024.0) << " | "
         << fmt("%.1f", stall / n) << " | " << fmt("%.1f", ms / n) << " |\n";
    }
  }
  md << "\n";
  return md.str();
}

static const char* kCsvHeader =
    "task,policy,length,prompt_tokens,depth,seed,score,nll,ppl,kl_mean,kl_max,top1,greedy_prefix,greedy_match,answer_top1,answer_nll,answer,output,"
    "bits,group,topk,window,sinks,shift,guess,debias,predecode,fast_bytes,slow_bytes,fetched_bytes_per_step,prefetch_reuse_rate,spec_recall,"
    "guess_hit_rate,exact_mass_served,stall_ms,copy_ms,decode_steps,refetch_steps,decode_ms_per_token,prefill_ms,prefill_reused";

std::string csv_report(const std::vector<CaseResult>& r) {
  std::ostringstream s;
  s << kCsvHeader << "\n";
  for (const auto& c : r) {
    s << c.task << "," << csv_field(c.policy) << "," << c.length << "," << c.prompt_tokens << ","
      << (c.depth >= 0 ? num(c.depth) : "") << "," << (c.seed >= 0 ? std::to_string(c.seed) : "") << "," << num(c.score) << "," << num(metric(c, "nll")) << ","
      << num(metric(c, "ppl")) << "," << num(metric(c, "kl_mean")) << "," << num(metric(c, "kl_max")) << ","
      << num(metric(c, "top1")) << "," << num(metric(c, "greedy_prefix")) << "," << num(metric(c, "greedy_match")) << ","
      << num(metric(c, "answer_top1")) << "," << num(metric(c, "answer_nll")) << "," << csv_field(c.answer) << "," << csv_field(c.output) << "," << c.kv.bits << "," << c.kv.group << "," << c.kv.topk
      << "," << c.kv.window << "," << c.kv.sinks << "," << num(c.kv.shift) << "," << c.kv.guess << "," << num(c.kv.debias) << "," << c.kv.predecode << "," << c.stats.fast_bytes << "," << c.stats.slow_bytes << ","
      << num(c.stats.fetched_bytes_per_step) << "," << num(c.stats.prefetch_reuse_rate) << "," << num(c.stats.spec_recall)
      << "," << num(metric(c, "guess_hit_rate")) << "," << num(c.stats.exact_mass_served) << "," << num(c.stats.stall_ms) << "," << num(c.stats.copy_ms) << ","
      << c.stats.decode_steps << "," << c.stats.refetch_steps << "," << num(c.decode_ms_per_token) << "," << num(c.prefill_ms) << "," << c.prefill_reused << "\n";
  }
  return s.str();
}

std::string json_report(const std::vector<CaseResult>& r, const EvalOptions& o) {
  nlohmann::json j;
  j["options"] = {{"tasks", o.tasks}, {"lengths", o.lengths}, {"depths", o.depths}, {"seeds", o.seeds},
                  {"gen", o.gen}, {"ppl_tokens", o.ppl_tokens}, {"agree_tokens", o.agree_tokens},
                  {"needle", o.niah.needle}, {"question", o.niah.question}, {"chat", !o.niah.chat_template.empty()}};
  std::vector<std::string> labels;
  for (const auto& p : o.policies) labels.push_back(p.label);
  j["options"]["policies"] = labels;
  nlohmann::json cases = nlohmann::json::array();
  for (const auto& c : r) {
    nlohmann::json x = {{"task", c.task}, {"policy", c.policy}, {"length", c.length}, {"prompt_tokens", c.prompt_tokens},
                        {"score", c.score}, {"metrics", c.metrics}, {"answer", c.answer}, {"output", c.output},
                        {"decode_ms_per_token", c.decode_ms_per_token}, {"prefill_ms", c.prefill_ms},
                        {"prefill_reused", c.prefill_reused}};
    if (c.depth >= 0) x["depth"] = c.depth;
    if (c.seed >= 0) x["seed"] = c.seed;
    x["kv_config"] = {{"policy", c.kv.policy}, {"bits", c.kv.bits}, {"group", c.kv.group}, {"topk", c.kv.topk},
                      {"window", c.kv.window}, {"sinks", c.kv.sinks}, {"shift", c.kv.shift}, {"guess", c.kv.guess}, {"debias", c.kv.debias},
                      {"predecode", c.kv.predecode}};
    x["kv_stats"] = {{"fast_bytes", c.stats.fast_bytes}, {"slow_bytes", c.stats.slow_bytes},
                     {"fetched_bytes_per_step", c.stats.fetched_bytes_per_step},
                     {"prefetch_reuse_rate", c.stats.prefetch_reuse_rate}, {"spec_recall", c.stats.spec_recall},
                     {"exact_mass_served", c.stats.exact_mass_served}, {"stall_ms", c.stats.stall_ms},
                     {"copy_ms", c.stats.copy_ms}, {"decode_steps", c.stats.decode_steps},
                     {"refetch_steps", c.stats.refetch_steps}};
    cases.push_back(std::move(x));
  }
  j["cases"] = std::move(cases);
  return j.dump(1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::vector<CaseResult> results_from_json(const std::string& text) {
  std::vector<CaseResult> out;
  try {
    const auto j = nlohmann::json::parse(text);
    for (const auto& x : j.at("cases")) {
      CaseResult c;
      c.task = x.at("task"), c.policy = x.at("policy"), c.length = x.at("length"), c.prompt_tokens = x.at("prompt_tokens");
      c.score = x.at("score"), c.answer = x.at("answer"), c.output = x.at("output");
      c.metrics = x.at("metrics").get<std::map<std::string, double>>();
      c.decode_ms_per_token = x.at("decode_ms_per_token"), c.prefill_ms = x.at("prefill_ms");
      c.prefill_reused = x.value("prefill_reused", (int64_t)0);  // reports before prefix sharing
      if (x.contains("depth")) c.depth = x.at("depth");
      if (x.contains("seed")) c.seed = x.at("seed");
      const auto& k = x.at("kv_config");
      c.kv.policy = k.at("policy"), c.kv.bits = k.at("bits"), c.kv.group = k.at("group"), c.kv.topk = k.at("topk");
      c.kv.window = k.at("window"), c.kv.sinks = k.at("sinks");
      c.kv.shift = k.value("shift", 0.0f);  // reports written before --kv-shift existed used the paper's rule
      c.kv.guess = k.value("guess", std::string("model"));  // and before --kv-guess, row 1's argmax
      c.kv.debias = k.value("debias", 0.0f);  // and before --kv-debias, the paper's scores
      c.kv.predecode = k.value("predecode", std::string("lowbit"));  // and before --kv-predecode, own low-bit top-k
      const auto& st = x.at("kv_stats");
      c.stats.policy = c.kv.policy;
      c.stats.fast_bytes = st.at("fast_bytes"), c.stats.slow_bytes = st.at("slow_bytes");
      c.stats.fetched_bytes_per_step = st.at("fetched_bytes_per_step");
      c.stats.prefetch_reuse_rate = st.at("prefetch_reuse_rate"), c.stats.spec_recall = st.at("spec_recall");
      c.stats.exact_mass_served = st.at("exact_mass_served"), c.stats.stall_ms = st.at("stall_ms");
      c.stats.copy_ms = st.at("copy_ms"), c.stats.decode_steps = st.at("decode_steps");
      c.stats.refetch_steps = st.value("refetch_steps", uint64_t{0});  // reports before specache-refetch
      out.push_back(std::move(c));
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(strfmt("eval results JSON: %s", e.what()));
  }
  return out;
}

std::string heatmap_svg(const std::vector<CaseResult>& r, const std::string& task, const std::string& policy) {
  std::vector<CaseResult> sel;
  for (const auto& c : r)
    if (c.task == task && c.policy == policy) sel.push_back(c);
  if (sel.empty()) return "";
  const auto Ls = lengths_of(sel, task);
  const auto Ds = depths_of(sel, task);
  const int cw = 80, ch = 34, left = 90, top = 56, right = 20, bottom = 50;
  const int W = left + cw * (int)Ls.size() + right, H = top + ch * (int)Ds.size() + bottom;
  std::ostringstream s;
  s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" viewBox=\"0 0 " << W << " "
    << H << "\" font-family=\"sans-serif\" font-size=\"12\">\n";
  s << "<rect x=\"0\" y=\"0\" width=\"" << W << "\" height=\"" << H << "\" fill=\"white\"/>\n";
  s << "<text x=\"" << W / 2 << "\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">"
    << xml_escape(task + ": " + policy) << "</text>\n";
  s << "<text x=\"" << W / 2 << "\" y=\"40\" text-anchor=\"middle\" font-size=\"11\" fill=\"#555\">share of cases solved (1 = answer found)</text>\n";
  for (size_t di = 0; di < Ds.size(); ++di)
    for (size_t li = 0; li < Ls.size(); ++li) {
      double sum = 0;
      int n = 0;
      for (const auto& c : sel)
        if (c.length == Ls[li] && c.depth == Ds[di]) sum += c.score, ++n;
      const int x = left + cw * (int)li, y = top + ch * (int)di;
      if (!n) {
        s << "<rect x=\"" << x << "\" y=\"" << y << "\" width=\"" << cw << "\" height=\"" << ch
          << "\" fill=\"#dddddd\" stroke=\"white\"/>\n";
        continue;
      }
      const double v = std::clamp(sum / n, 0.0, 1.0);
      // red (215,48,39) -> yellow (254,224,139) -> green (26,152,80)
      auto lerp = [](double a, double b, double t) { return (int)std::lround(a + (b - a) * t); };
      int R, G, B;
      if (v < 0.5) R = lerp(215, 254, v * 2), G = lerp(48, 224, v * 2), B = lerp(39, 139, v * 2);
      else R = lerp(254, 26, v * 2 - 1), G = lerp(224, 152, v * 2 - 1), B = lerp(139, 80, v * 2 - 1);
      char color[16];
      std::snprintf(color, sizeof color, "#%02x%02x%02x", R, G, B);
      s << "<rect x=\"" << x << "\" y=\"" << y << "\" width=\"" << cw << "\" height=\"" << ch << "\" fill=\"" << color
        << "\" stroke=\"white\"/>\n";
      s << "<text x=\"" << x + cw / 2 << "\" y=\"" << y + ch / 2 + 4 << "\" text-anchor=\"middle\">" << fmt("%.2f", v)
        << "</text>\n";
    }
  for (size_t li = 0; li < Ls.size(); ++li)
    s << "<text x=\"" << left + cw * (int)li + cw / 2 << "\" y=\"" << top + ch * (int)Ds.size() + 16
      << "\" text-anchor=\"middle\">" << Ls[li] << "</text>\n";
  for (size_t di = 0; di < Ds.size(); ++di)
    s << "<text x=\"" << left - 8 << "\" y=\"" << top + ch * (int)di + ch / 2 + 4 << "\" text-anchor=\"end\">"
      << fmt("%.0f%%", Ds[di] * 100) << "</text>\n";
  s << "<text x=\"" << left + cw * (int)Ls.size() / 2 << "\" y=\"" << H - 10
    << "\" text-anchor=\"middle\">context length (tokens)</text>\n";
  s << "<text x=\"16\" y=\"" << top + ch * (int)Ds.size() / 2 << "\" text-anchor=\"middle\" transform=\"rotate(-90 16 "
    << top + ch * (int)Ds.size() / 2 << ")\">needle depth</text>\n";
  s << "</svg>\n";
  return s.str();
}

std::vector<std::string> write_heatmaps(const std::vector<CaseResult>& r, const std::string& dir) {
  std::filesystem::create_directories(dir);
  std::vector<std::string> written;
  for (const char* task : {"passkey", "niah"})
    for (const auto& p : policy_order(r)) {
      const std::string svg = heatmap_svg(r, task, p);
      if (svg.empty()) continue;
      std::string name = p;
      for (char& ch : name)
        if (!std::isalnum((unsigned char)ch) && ch != '-' && ch != '_') ch = '-';
      const std::string path = (std::filesystem::path(dir) / (std::string(task) + "_" + name + ".svg")).string();
      write_text_file(path, svg);
      written.push_back(path);
    }
  return written;
}

}  // namespace spc::eval
