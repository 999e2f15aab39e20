#include "engine/generate.h"

namespace spc {

std::string Utf8Stream::push(const std::string& bytes) {
  pending_ += bytes;
  // Find the start of a trailing incomplete sequence, if any.
  size_t n = pending_.size(), cut = n;
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const unsigned char c = (unsigned char)pending_[n - back];
    if ((c & 0xC0) == 0x80) continue;  // continuation byte
    const size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    if (need > back) cut = n - back;
    break;
  }
  std::string out = pending_.substr(0, cut);
  pending_.erase(0, cut);
  return out;
}

std::string Utf8Stream::flush() {
  std::string out;
  out.swap(pending_);
  return out;
}

GenerateResult generate(Session& session, const Tokenizer& tok, const GenerateOptions& opt,
                        const std::function<void(const std::string&)>& on_text) {
  GenerateResult res;
  Sampler sampler(opt.sampler);
  Utf8Stream stream;
  const int n_vocab = (int)session.logits().size();
  const int64_t n_ctx = session.kv().geometry().n_ctx;
  auto emit = [&](const std::string& s) {
    res.text += s;
    if (on_text && !s.empty()) on_text(s);
  };
  for (int i = 0; opt.n_predict < 0 || i < opt.n_predict; ++i) {
    const int32_t t = sampler.sample(session.logits().data(), n_vocab);
    if (!opt.ignore_eos && tok.is_end_of_generation(t)) {
      res.stopped_at_eos = true;
      break;
    }
    res.tokens.push_back(t);
    emit(stream.push(tok.token_to_piece(t)));
    const bool last = opt.n_predict >= 0 && i + 1 == opt.n_predict;
    if (last) break;
    if (session.n_past() >= n_ctx) {
      res.stopped_at_context = true;
      break;
    }
    session.decode(t);
  }
  emit(stream.flush());
  return res;
}

}  // namespace spc
