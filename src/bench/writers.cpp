// CSV, JSON, text-table and SVG output of a bench report.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>
#include <sstream>

#include "bench/bench.h"
#include "util/error.h"
#include "util/text_out.h"

namespace spc::bench {

namespace {

std::string num(double v, int prec = 6) { return format_number(v, prec); }

bool several_thread_counts(const BenchReport& r) {
  std::set<int> t;
  for (const auto& row : r.rows) t.insert(row.threads);
  return t.size() > 1;
}

bool batched(const BenchReport& r) {
  for (const auto& row : r.rows)
    if (row.batch != 1) return true;
  return false;
}

std::string series_name(const BenchRow& row, bool with_threads, bool with_batch) {
  std::string s = row.policy_spec;
  if (with_threads) s += strfmt(" @%dt", row.threads);
  if (with_batch) s += strfmt(" x%d%s", row.batch, row.batch_share && row.batch > 1 ? " shared" : "");
  return s;
}

// The row's policy column in the text table: the spec, with " xB" for batched rows (" xBs" where
// they share one cache of the prompt).
std::string row_label(const BenchRow& row) {
  return row.batch == 1 ? row.policy_spec
                        : strfmt("%s x%d%s", row.policy_spec.c_str(), row.batch, row.batch_share ? "s" : "");
}

}  // namespace

std::vector<std::string> csv_columns() {
  return {"model", "policy_spec", "policy", "bits", "depth", "threads", "batch", "batch_share", "reps", "gen", "decode_samples",
          "prefill_ms", "prefill_tok_per_s", "decode_ms_median", "decode_ms_p25", "decode_ms_p75", "decode_ms_min",
          "decode_ms_max", "decode_tok_per_s", "batch_tok_per_s", "weight_bytes_per_token", "kv_fast_bytes_per_token",
          "kv_slow_bytes_per_token", "total_bytes_per_token", "achieved_gb_per_s", "kv_fast_bytes", "kv_slow_bytes",
          "stall_ms_per_token", "copy_ms_per_token", "peak_rss_bytes", "bandwidth_gb_per_s", "floor_ms",
          "floor_ratio", "paired_ratio", "phase_qkv_ms", "phase_attend_ms", "phase_wo_ms", "phase_ffn_ms",
          "phase_end_step_ms", "phase_output_ms", "prompt", "decode_act", "prefill_act", "prefill_attn", "git_commit", "build_type", "cxx_flags", "cpu"};
}

std::string to_csv(const BenchReport& r) {
  std::string out;
  const auto cols = csv_columns();
  for (size_t i = 0; i < cols.size(); ++i) {
    if (i) out += ',';
    out += cols[i];
  }
  out += '\n';
  const bool bw = !r.bandwidth.empty();
  for (const BenchRow& row : r.rows) {
    const std::vector<std::string> f = {
        row.model, row.policy_spec, row.policy, std::to_string(row.bits), std::to_string(row.depth),
        std::to_string(row.threads), std::to_string(row.batch), row.batch_share ? "1" : "0", std::to_string(row.reps),
        std::to_string(row.gen),
        std::to_string(row.decode_samples), num(row.prefill_ms), num(row.prefill_tok_per_s), num(row.decode_ms.median),
        num(row.decode_ms.p25), num(row.decode_ms.p75), num(row.decode_ms.min), num(row.decode_ms.max),
        num(row.decode_ms.median > 0 ? 1000.0 / row.decode_ms.median : 0), num(row.batch_tok_per_s),
        std::to_string(row.bytes.weights),
        std::to_string(row.bytes.kv_fast), num(row.bytes.kv_slow, 10), num(row.bytes.total(), 12),
        num(row.achieved_gb_per_s), std::to_string(row.kv_fast_bytes), std::to_string(row.kv_slow_bytes),
        num(row.stall_ms_per_token), num(row.copy_ms_per_token), std::to_string(row.peak_rss_bytes),
        bw ? num(row.bandwidth_gb_per_s) : "", bw ? num(row.floor_ms) : "", bw ? num(row.floor_ratio) : "",
        r.interleaved ? num(row.paired_ratio) : "", num(row.phases_ms.qkv_ms), num(row.phases_ms.attend_ms),
        num(row.phases_ms.wo_ms), num(row.phases_ms.ffn_ms), num(row.phases_ms.end_step_ms),
        num(row.phases_ms.output_ms), r.prompt_kind + (r.prompt_path.empty() ? "" : ":" + r.prompt_path),
        r.decode_act, r.prefill_act, r.prefill_attn, r.build.git_commit, r.build.build_type, r.build.cxx_flags, r.cpu};
    SPC_ASSERT(f.size() == cols.size());
    for (size_t i = 0; i < f.size(); ++i) {
      if (i) out += ',';
      out += csv_field(f[i]);
    }
    out += '\n';
  }
  return out;
}

nlohmann::json to_json(const BenchReport& r) {
  using nlohmann::json;
  json j;
  j["schema"] = "specache-bench/1";
  j["model"] = r.model_path;
  j["prompt"] = {{"kind", r.prompt_kind}, {"path", r.prompt_path}};
  j["build"] = {{"git_commit", r.build.git_commit},
                {"build_type", r.build.build_type},
                {"compiler", r.build.compiler},
                {"cxx_flags", r.build.cxx_flags}};
  j["cpu"] = r.cpu;
  j["hardware_threads"] = r.hardware_threads;
  j["decode_act"] = r.decode_act;
  j["prefill_act"] = r.prefill_act;
  j["prefill_attn"] = r.prefill_attn;
  j["measurement"] = r.measurement;
  j["interleaved"] = r.interleaved;
  json bw = json::array();
  for (const auto& b : r.bandwidth)
    bw.push_back({{"threads", b.threads},
                  {"buffer_bytes", b.buffer_bytes},
                  {"passes", b.passes},
                  {"best_gb_per_s", b.best_gb_per_s},
                  {"median_gb_per_s", b.median_gb_per_s}});
  if (!r.bandwidth.empty()) j["bandwidth"] = bw;
  json rows = json::array();
  for (const BenchRow& row : r.rows) {
    json o = {{"model", row.model},
              {"policy_spec", row.policy_spec},
              {"policy", row.policy},
              {"bits", row.bits},
              {"depth", row.depth},
              {"threads", row.threads},
              {"batch", row.batch},
              {"batch_share", row.batch_share},
              {"reps", row.reps},
              {"gen", row.gen},
              {"prefill_ms", row.prefill_ms},
              {"prefill_tok_per_s", row.prefill_tok_per_s},
              {"decode_ms_per_token",
               {{"median", row.decode_ms.median},
                {"p25", row.decode_ms.p25},
                {"p75", row.decode_ms.p75},
                {"min", row.decode_ms.min},
                {"max", row.decode_ms.max},
                {"mean", row.decode_ms.mean},
                {"samples", row.decode_samples}}},
              {"decode_tok_per_s", row.decode_ms.median > 0 ? 1000.0 / row.decode_ms.median : 0.0},
              {"batch_tok_per_s", row.batch_tok_per_s},
              {"bytes_per_token",
               {{"weights", row.bytes.weights},
                {"kv_fast", row.bytes.kv_fast},
                {"kv_slow", row.bytes.kv_slow},
                {"total", row.bytes.total()}}},
              {"achieved_gb_per_s", row.achieved_gb_per_s},
              {"kv_fast_bytes", row.kv_fast_bytes},
              {"kv_slow_bytes", row.kv_slow_bytes},
              {"stall_ms_per_token", row.stall_ms_per_token},
              {"copy_ms_per_token", row.copy_ms_per_token},
              {"peak_rss_bytes", row.peak_rss_bytes},
              {"peak_rss_reset_before_row", row.peak_rss_reset},
              {"decode_phases_ms", decode_phases_json(row.phases_ms)},
              {"decode_act", r.decode_act},
              {"prefill_act", r.prefill_act},
              {"prefill_attn", r.prefill_attn},
              {"git_commit", r.build.git_commit},
              {"build_type", r.build.build_type},
              {"cxx_flags", r.build.cxx_flags},
              {"cpu", r.cpu}};
    if (!r.bandwidth.empty()) {
      o["bandwidth_gb_per_s"] = row.bandwidth_gb_per_s;
      o["floor_ms"] = row.floor_ms;
      o["floor_ratio"] = row.floor_ratio;
    }
    o["decode_phases_ms"]["steps"] = row.phases_ms.steps;  // the measured steps the means are over
    if (r.interleaved) o["paired_ratio"] = row.paired_ratio;
    rows.push_back(std::move(o));
  }
  j["rows"] = rows;
  return j;
}

nlohmann::json decode_phases_json(const DecodePhases& p, double per) {
  return {{"qkv", p.qkv_ms / per}, {"attend", p.attend_ms / per}, {"wo", p.wo_ms / per},
          {"ffn", p.ffn_ms / per}, {"end_step", p.end_step_ms / per}, {"output", p.output_ms / per}};
}

std::string to_table(const BenchReport& r) {
  const bool bw = !r.bandwidth.empty();
  std::ostringstream o;
  char buf[512];
  std::snprintf(buf, sizeof buf, "%-16s %6s %3s %9s %9s %17s %8s %8s %8s %7s", "policy", "depth", "thr", "prefill",
                "decode", "(p25 .. p75)", "weights", "KV fast", "KV slow", "GB/s");
  o << buf;
  if (bw) {
    std::snprintf(buf, sizeof buf, " %7s %8s %6s", "probe", "floor", "x");
    o << buf;
  }
  if (r.interleaved) {
    std::snprintf(buf, sizeof buf, " %7s", "paired");
    o << buf;
  }
  const bool with_batch = batched(r);
  if (with_batch) {
    std::snprintf(buf, sizeof buf, " %8s", "batch");
    o << buf;
  }
  std::snprintf(buf, sizeof buf, " %8s %8s\n", "stall", "RSS");
  o << buf;
  std::snprintf(buf, sizeof buf, "%-16s %6s %3s %9s %9s %17s %8s %8s %8s %7s", "", "", "", "tok/s", "ms/tok", "ms",
                "MB/tok", "MB/tok", "MB/tok", "");
  o << buf;
  if (bw) {
    std::snprintf(buf, sizeof buf, " %7s %8s %6s", "GB/s", "ms/tok", "floor");
    o << buf;
  }
  if (r.interleaved) {
    std::snprintf(buf, sizeof buf, " %7s", "x first");
    o << buf;
  }
  if (with_batch) {
    std::snprintf(buf, sizeof buf, " %8s", "tok/s");
    o << buf;
  }
  std::snprintf(buf, sizeof buf, " %8s %8s\n", "ms/tok", "MiB");
  o << buf;
  for (const BenchRow& row : r.rows) {
    const std::string spread = strfmt("%.3f .. %.3f", row.decode_ms.p25, row.decode_ms.p75);
    std::snprintf(buf, sizeof buf, "%-16s %6lld %3d %9.1f %9.3f %17s %8.2f %8.2f %8.2f %7.2f", row_label(row).c_str(),
                  (long long)row.depth, row.threads, row.prefill_tok_per_s, row.decode_ms.median, spread.c_str(),
                  row.bytes.weights / 1e6, row.bytes.kv_fast / 1e6, row.bytes.kv_slow / 1e6, row.achieved_gb_per_s);
    o << buf;
    if (bw) {
      std::snprintf(buf, sizeof buf, " %7.2f %8.3f %6.2f", row.bandwidth_gb_per_s, row.floor_ms, row.floor_ratio);
      o << buf;
    }
    if (r.interleaved) {
      std::snprintf(buf, sizeof buf, " %7.3f", row.paired_ratio);
      o << buf;
    }
    if (with_batch) {
      std::snprintf(buf, sizeof buf, " %8.1f", row.batch_tok_per_s);
      o << buf;
    }
    std::snprintf(buf, sizeof buf, " %8.3f %8.1f\n", row.stall_ms_per_token, row.peak_rss_bytes / 1048576.0);
    o << buf;
  }
  if (with_batch)
    o << "rows \"POLICY xB\": B sequences decoded together; their decode, MB, stall and floor figures are per step\n"
         "(one token of each sequence), and batch tok/s counts the tokens of all B\n";
  // Where a decode step goes: the model's phases, mean ms per measured step.
  o << "\nwhere a decode step goes (mean ms per measured step: q/k/v, the KV policy's attend, output\n"
       "projection, FFN, the policy's end of step, logits; the table above gives medians):\n";
  std::snprintf(buf, sizeof buf, "%-16s %6s %3s %8s %8s %8s %8s %8s %8s %8s\n", "policy", "depth", "thr", "qkv", "attend",
                "wo", "ffn", "end", "output", "sum");
  o << buf;
  for (const BenchRow& row : r.rows) {
    const DecodePhases& p = row.phases_ms;
    std::snprintf(buf, sizeof buf, "%-16s %6lld %3d %8.3f %8.3f %8.3f %8.3f %8.3f %8.3f %8.3f\n", row_label(row).c_str(),
                  (long long)row.depth, row.threads, p.qkv_ms, p.attend_ms, p.wo_ms, p.ffn_ms, p.end_step_ms,
                  p.output_ms, p.total_ms());
    o << buf;
  }
  return o.str();
}

std::string to_svg(const BenchReport& r) {
  const double W = 760, H = 460, ml = 72, mr = 190, mt = 48, mb = 64;
  const double pw = W - ml - mr, ph = H - mt - mb;
  const bool with_threads = several_thread_counts(r), with_batch = batched(r);

  // Series in first-seen order; points sorted by depth.
  std::vector<std::string> order;
  std::map<std::string, std::vector<const BenchRow*>> series;
  for (const BenchRow& row : r.rows) {
    const std::string k = series_name(row, with_threads, with_batch);
    if (!series.count(k)) order.push_back(k);
    series[k].push_back(&row);
  }
  for (auto& [k, v] : series)
    std::sort(v.begin(), v.end(), [](const BenchRow* a, const BenchRow* b) { return a->depth < b->depth; });

  std::set<int64_t> depths;
  double ymax = 0;
  for (const BenchRow& row : r.rows) {
    depths.insert(row.depth);
    ymax = std::max(ymax, std::max(row.decode_ms.p75, row.decode_ms.median));
  }
  if (depths.empty()) depths.insert(1);
  if (ymax <= 0) ymax = 1;
  // Nice y step: 1, 2 or 5 times a power of ten, about 5 ticks.
  const double raw = ymax * 1.1 / 5;
  const double p10 = std::pow(10.0, std::floor(std::log10(raw)));
  const double step = raw / p10 <= 1 ? p10 : raw / p10 <= 2 ? 2 * p10 : raw / p10 <= 5 ? 5 * p10 : 10 * p10;
  const double ytop = std::ceil(ymax * 1.1 / step) * step;

  const double dmin = (double)*depths.begin(), dmax = (double)*depths.rbegin();
  const bool logx = dmin > 0 && dmax / dmin >= 4;
  auto xpos = [&](double d) {
    if (dmax == dmin) return ml + pw / 2;
    const double f = logx ? (std::log2(d) - std::log2(dmin)) / (std::log2(dmax) - std::log2(dmin)) : (d - dmin) / (dmax - dmin);
    return ml + pw * (0.04 + 0.92 * f);
  };
  auto ypos = [&](double v) { return mt + ph * (1 - v / ytop); };

  static const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                 "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"};
  std::ostringstream o;
  o.setf(std::ios::fixed);
  o.precision(1);
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" viewBox=\"0 0 " << W << ' '
    << H << "\" font-family=\"sans-serif\" font-size=\"12\">\n";
  o << "<rect x=\"0\" y=\"0\" width=\"" << W << "\" height=\"" << H << "\" fill=\"white\"/>\n";
  std::string title = "decode ms/token vs context depth";
  if (!r.rows.empty()) {
    title += " \xe2\x80\x94 " + r.rows.front().model;
    if (!with_threads) title += strfmt(", %d thread(s)", r.rows.front().threads);
  }
  o << "<text x=\"" << ml + pw / 2 << "\" y=\"24\" text-anchor=\"middle\" font-size=\"14\">" << xml_escape(title)
    << "</text>\n";
  // Grid and y ticks.
  for (double v = 0; v <= ytop + step * 1e-6; v += step) {
    const double y = ypos(v);
    o << "<line x1=\"" << ml << "\" y1=\"" << y << "\" x2=\"" << ml + pw << "\" y2=\"" << y
      << "\" stroke=\"#e0e0e0\"/>\n";
    o << "<text x=\"" << ml - 6 << "\" y=\"" << y + 4 << "\" text-anchor=\"end\">" << num(v, 4) << "</text>\n";
  }
  // x ticks at the measured depths.
  for (int64_t d : depths) {
    const double x = xpos((double)d);
    o << "<line x1=\"" << x << "\" y1=\"" << mt + ph << "\" x2=\"" << x << "\" y2=\"" << mt + ph + 5
      << "\" stroke=\"black\"/>\n";
    o << "<text x=\"" << x << "\" y=\"" << mt + ph + 19 << "\" text-anchor=\"middle\">" << d << "</text>\n";
  }
  // Axes.
  o << "<line x1=\"" << ml << "\" y1=\"" << mt << "\" x2=\"" << ml << "\" y2=\"" << mt + ph << "\" stroke=\"black\"/>\n";
  o << "<line x1=\"" << ml << "\" y1=\"" << mt + ph << "\" x2=\"" << ml + pw << "\" y2=\"" << mt + ph
    << "\" stroke=\"black\"/>\n";
  o << "<text x=\"" << ml + pw / 2 << "\" y=\"" << H - 18 << "\" text-anchor=\"middle\">context depth (tokens"
    << (logx ? ", log scale" : "") << ")</text>\n";
  o << "<text transform=\"translate(18," << mt + ph / 2
    << ") rotate(-90)\" text-anchor=\"middle\">decode ms/token (median, p25\xe2\x80\x93p75)</text>\n";
  // Series.
  for (size_t si = 0; si < order.size(); ++si) {
    const char* c = colors[si % (sizeof colors / sizeof *colors)];
    const auto& pts = series[order[si]];
    o << "<polyline class=\"series\" data-series=\"" << xml_escape(order[si]) << "\" fill=\"none\" stroke=\"" << c
      << "\" stroke-width=\"2\" points=\"";
    for (size_t i = 0; i < pts.size(); ++i)
      o << (i ? " " : "") << xpos((double)pts[i]->depth) << ',' << ypos(pts[i]->decode_ms.median);
    o << "\"/>\n";
    for (const BenchRow* p : pts) {
      const double x = xpos((double)p->depth);
      o << "<line x1=\"" << x << "\" y1=\"" << ypos(p->decode_ms.p25) << "\" x2=\"" << x << "\" y2=\""
        << ypos(p->decode_ms.p75) << "\" stroke=\"" << c << "\"/>\n";
      o << "<circle cx=\"" << x << "\" cy=\"" << ypos(p->decode_ms.median) << "\" r=\"3\" fill=\"" << c << "\"><title>"
        << xml_escape(order[si]) << " depth " << p->depth << ": " << num(p->decode_ms.median, 4)
        << " ms/token</title></circle>\n";
    }
    // Legend entry.
    const double ly = mt + 10 + 20.0 * (double)si, lx = ml + pw + 16;
    o << "<line x1=\"" << lx << "\" y1=\"" << ly << "\" x2=\"" << lx + 22 << "\" y2=\"" << ly << "\" stroke=\"" << c
      << "\" stroke-width=\"2\"/>\n";
    o << "<text x=\"" << lx + 28 << "\" y=\"" << ly + 4 << "\">" << xml_escape(order[si]) << "</text>\n";
  }
  o << "</svg>\n";
  return o.str();
}

}  // namespace spc::bench
