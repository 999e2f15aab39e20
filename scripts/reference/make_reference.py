#!/usr/bin/env python3
"""Independent NumPy reference forward pass for GGUF Llama-family models.

Produces the golden files the specache engine is tested against:

  tests/data/stories260k_greedy.json   stories260K (all F32): greedy from BOS,
                                       and a prompted case with prefill logits
  tests/data/smollm2_ref.json          SmolLM2-135M-Instruct Q4_1: ~300-token
                                       War-and-Peace prompt, per-position top-2,
                                       32-token greedy continuation
  tests/data/smollm2_ref_logits.bin    float32 LE [4][49152] full logits at the
                                       positions listed in smollm2_ref.json

How to run (from the repository root; deterministic, 25-65 s on 2 cores):

  /opt/specache-venv/bin/python scripts/reference/make_reference.py
      [--stories PATH] [--smollm PATH] [--text PATH] [--out DIR]
      [--only stories|smollm]

Requirements: numpy, gguf (the llama.cpp `gguf` PyPI package: GGUFReader and
gguf.quants.dequantize) and, for SmolLM2, HF `tokenizers`.

This implementation deliberately shares no code with the engine: weights are
read with gguf.GGUFReader, dequantized with gguf.quants.dequantize (which
reproduces GGML's dequantization in float32: Q4_1 -> d*q + m, Q8_0 -> d*q),
then promoted *exactly* to float64. All arithmetic (matmuls, RMSNorm, RoPE,
softmax, SiLU) is done in float64. So the reference is the "exact" model
defined by the dequantized weights; it does NOT emulate GGML's quantized
dot products (e.g. Q8 activation quantization), so an engine that quantizes
activations will differ slightly from it.

Forward pass (per layer, pre-norm):
  x = embed[tok]
  h = rmsnorm(x) * attn_norm            rmsnorm(x) = x / sqrt(mean(x^2) + eps)
  q, k, v = h Wq^T (+bq), h Wk^T (+bk), h Wv^T (+bv)
  rope(q), rope(k) at absolute positions  (llama: GGML "normal" rope, pairs
      (x[2i], x[2i+1]); qwen2: NeoX rope, pairs (x[i], x[i+n_rot/2]));
      angle = pos * base^(-2i/n_rot)
  causal softmax(q k^T / sqrt(head_dim)) v with GQA: query head h uses kv
      head h // (n_head / n_head_kv)
  x += attn Wo^T
  h = rmsnorm(x) * ffn_norm
  x += (silu(h Wg^T) * (h Wu^T)) Wd^T
  logits = (rmsnorm(x) * output_norm) Wout^T, Wout = output.weight or, if
      absent, token_embd.weight (tied)
Greedy = np.argmax (ties -> lowest id); generation never stops at EOS.
qwen2 support (biases, NeoX rope) is implemented but untested (no qwen2 model
was available when this was written).
"""

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np
import gguf

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_STORIES = "/work/shared/models/stories260K/stories260K.gguf"
DEFAULT_SMOLLM = os.path.join(
    os.environ.get("SPECACHE_CACHE",
                   os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "specache")),
    "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_TEXT = "/work/shared/data/gutenberg/pg2600-war-and-peace.txt"

# SmolLM2 prompt: these 1-based line numbers of the Gutenberg file (inside
# Book One, Chapter XVI, well past the header ending at line 25), joined by
# "\n" as they appear in the file (blank lines kept).
SMOLLM_TEXT_LINES = (2022, 2038)
SMOLLM_LOGIT_POSITIONS_FRAC = (0, 100, 200, -1)  # -1 = last prompt position
SMOLLM_N_GREEDY = 32

STORIES_N_GREEDY = 200
STORIES_PROMPT_TEXT = "Once upon a time, there was a"
STORIES_PROMPT_N_GREEDY = 100


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------

class Model:
    def __init__(self, path):
        self.path = path
        r = gguf.GGUFReader(path)
        self.reader = r
        self.fields = r.fields
        arch = self.meta("general.architecture")
        if arch not in ("llama", "qwen2"):
            raise NotImplementedError(f"architecture {arch!r}")
        self.arch = arch
        a = arch
        self.n_embd = int(self.meta(f"{a}.embedding_length"))
        self.n_layer = int(self.meta(f"{a}.block_count"))
        self.n_head = int(self.meta(f"{a}.attention.head_count"))
        self.n_head_kv = int(self.meta(f"{a}.attention.head_count_kv", self.n_head))
        self.head_dim = self.n_embd // self.n_head
        self.n_rot = int(self.meta(f"{a}.rope.dimension_count", self.head_dim))
        self.rope_base = float(self.meta(f"{a}.rope.freq_base", 10000.0))
        self.eps = float(self.meta(f"{a}.attention.layer_norm_rms_epsilon"))
        self.neox = (arch == "qwen2")
        st = self.meta(f"{a}.rope.scaling.type", "none")
        if st not in ("none", None):
            raise NotImplementedError(f"rope scaling {st!r}")
        self.tokens = list(self.meta("tokenizer.ggml.tokens"))

        self.t = {t.name: t for t in r.tensors}
        if "rope_freqs.weight" in self.t:
            raise NotImplementedError("rope_freqs (llama3 rope scaling)")
        self.embed = self.W("token_embd.weight")
        self.n_vocab = self.embed.shape[0]
        self.out_norm = self.W("output_norm.weight")
        self.out_w = self.W("output.weight") if "output.weight" in self.t else self.embed
        self.layers = []
        for i in range(self.n_layer):
            p = f"blk.{i}."
            L = {k: self.W(p + k + ".weight") for k in
                 ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                  "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
            for k in ("attn_q", "attn_k", "attn_v"):
                L[k + "_b"] = self.W(p + k + ".bias") if (p + k + ".bias") in self.t else None
            self.layers.append(L)
        L0 = self.layers[0]
        assert L0["attn_q"].shape == (self.n_head * self.head_dim, self.n_embd)
        assert L0["attn_k"].shape == (self.n_head_kv * self.head_dim, self.n_embd)
        assert self.n_head % self.n_head_kv == 0

        # RoPE inverse frequencies, float64
        i = np.arange(self.n_rot // 2, dtype=np.float64)
        self.inv_freq = self.rope_base ** (-2.0 * i / self.n_rot)

    def meta(self, key, default=KeyError):
        f = self.fields.get(key)
        if f is None:
            if default is KeyError:
                raise KeyError(key)
            return default
        return f.contents()

    def W(self, name):
        """Dequantized tensor as float64 [n_out, n_in] (GGUF ne reversed)."""
        t = self.t[name]
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(s) for s in reversed(t.shape))  # t.shape = ne[0], ne[1], ...
        a = np.asarray(a, dtype=np.float32).reshape(shape)
        return a.astype(np.float64)

    def rmsnorm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):
        """x: [T, H, head_dim], pos: [T] absolute positions."""
        ang = pos.astype(np.float64)[:, None] * self.inv_freq[None, :]  # [T, n_rot/2]
        c = np.cos(ang)[:, None, :]
        s = np.sin(ang)[:, None, :]
        x = x.copy()
        r = x[..., :self.n_rot]
        if self.neox:
            h = self.n_rot // 2
            x0, x1 = r[..., :h].copy(), r[..., h:].copy()
            r[..., :h] = x0 * c - x1 * s
            r[..., h:] = x0 * s + x1 * c
        else:
            x0, x1 = r[..., 0::2].copy(), r[..., 1::2].copy()
            r[..., 0::2] = x0 * c - x1 * s
            r[..., 1::2] = x0 * s + x1 * c
        return x

    def new_cache(self):
        return {"k": [None] * self.n_layer, "v": [None] * self.n_layer, "n": 0}

    def forward(self, tokens, cache):
        """Run `tokens` at positions cache['n'].. ; returns logits [T, n_vocab] (float64)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        T = len(tokens)
        p0 = cache["n"]
        pos = np.arange(p0, p0 + T)
        hd, H, Hkv = self.head_dim, self.n_head, self.n_head_kv
        g = H // Hkv
        scale = 1.0 / np.sqrt(hd)
        x = self.embed[tokens]
        S = p0 + T
        # mask[i, j] true where key j is in the future of query i
        mask = np.arange(S)[None, :] > pos[:, None]
        for li, L in enumerate(self.layers):
            h = self.rmsnorm(x, L["attn_norm"])
            q = h @ L["attn_q"].T
            k = h @ L["attn_k"].T
            v = h @ L["attn_v"].T
            if L["attn_q_b"] is not None:
                q = q + L["attn_q_b"]
            if L["attn_k_b"] is not None:
                k = k + L["attn_k_b"]
            if L["attn_v_b"] is not None:
                v = v + L["attn_v_b"]
            q = self.rope(q.reshape(T, H, hd), pos)
            k = self.rope(k.reshape(T, Hkv, hd), pos)
            v = v.reshape(T, Hkv, hd)
            if cache["k"][li] is not None:
                k = np.concatenate([cache["k"][li], k], axis=0)
                v = np.concatenate([cache["v"][li], v], axis=0)
            cache["k"][li], cache["v"][li] = k, v
            out = np.empty((T, H, hd))
            for hh in range(H):
                kv = hh // g
                sc = (q[:, hh, :] @ k[:, kv, :].T) * scale  # [T, S]
                sc = np.where(mask, -np.inf, sc)
                sc = sc - sc.max(axis=-1, keepdims=True)
                p = np.exp(sc)
                p /= p.sum(axis=-1, keepdims=True)
                out[:, hh, :] = p @ v[:, kv, :]
            x = x + out.reshape(T, H * hd) @ L["attn_output"].T
            h = self.rmsnorm(x, L["ffn_norm"])
            gt = h @ L["ffn_gate"].T
            up = h @ L["ffn_up"].T
            x = x + ((gt / (1.0 + np.exp(-gt))) * up) @ L["ffn_down"].T
        cache["n"] = S
        x = self.rmsnorm(x, self.out_norm)
        return x @ self.out_w.T


def greedy(model, prompt, n, cache=None, first_logits=None):
    """Greedy continuation of `prompt`. Returns (tokens, top1_logits, top2_logits)."""
    if cache is None:
        cache = model.new_cache()
    logits = model.forward(prompt, cache)[-1] if first_logits is None else first_logits
    toks, t1, t2 = [], [], []
    for step in range(n):
        nxt = int(np.argmax(logits))
        s = np.sort(logits)
        toks.append(nxt)
        t1.append(float(s[-1]))
        t2.append(float(s[-2]))
        if step + 1 < n:
            logits = model.forward([nxt], cache)[-1]
    return toks, t1, t2


# --------------------------------------------------------------------------
# stories260K (SentencePiece vocab with byte fallback)
# --------------------------------------------------------------------------

def spm_decode(tokens, ids, strip_prefix_space=True):
    out = bytearray()
    for i in ids:
        t = tokens[i]
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            out.append(int(t[3:5], 16))
        elif t in ("<s>", "</s>", "<unk>"):
            continue
        else:
            out += t.replace("\u2581", " ").encode("utf-8")
    s = out.decode("utf-8", errors="replace")
    return s[1:] if strip_prefix_space and s.startswith(" ") else s  # SentencePiece drops the prefix space


def spm_encode(tokens, scores, text):
    """SentencePiece-BPE as in llama.cpp's SPM tokenizer: ' ' -> '▁', a '▁'
    prefix, then repeatedly merge the adjacent pair whose concatenation is a
    vocab token with the highest score (leftmost on ties); leftover symbols
    not in the vocab fall back to <0xXX> byte tokens."""
    vocab = {t: i for i, t in enumerate(tokens)}
    s = "\u2581" + text.replace(" ", "\u2581")
    sym = list(s)
    while True:
        best, bi = None, -1
        for i in range(len(sym) - 1):
            j = vocab.get(sym[i] + sym[i + 1])
            if j is not None and (best is None or scores[j] > best):
                best, bi = scores[j], i
        if bi < 0:
            break
        sym[bi:bi + 2] = [sym[bi] + sym[bi + 1]]
    ids = []
    for t in sym:
        if t in vocab:
            ids.append(vocab[t])
        else:
            ids += [vocab["<0x%02X>" % b] for b in t.encode("utf-8")]
    return ids


def r6(a):
    return [round(float(v), 6) for v in a]


def make_stories(path, out_dir):
    t0 = time.time()
    m = Model(path)
    assert m.arch == "llama" and m.n_vocab == 512
    bos = int(m.meta("tokenizer.ggml.bos_token_id"))
    eos = int(m.meta("tokenizer.ggml.eos_token_id"))
    scores = [float(x) for x in m.meta("tokenizer.ggml.scores")]

    # case 1: greedy from BOS
    cache = m.new_cache()
    l0 = m.forward([bos], cache)[-1]
    toks, t1, t2 = greedy(m, [bos], STORIES_N_GREEDY, cache, first_logits=l0)
    text = spm_decode(m.tokens, toks)
    expected = ("Once upon a time, there was a little girl named Lily. She loved to play "
                "outside in the park. One day, she saw a big, red ball. She wanted to play with "
                "it, but it was too high.\nLily's mom said,")
    if not text.startswith(expected):
        sys.exit("stories260K sanity check FAILED; greedy text:\n" + text)
    print("stories260K sanity check OK (matches llama2.c doc/stories260K.md)")

    # cross-check: KV-cache decoding == recomputing the full sequence
    full = m.forward([bos] + toks[:-1], m.new_cache())
    assert np.array_equal(np.argmax(full, axis=-1), np.array(toks))
    assert np.max(np.abs(full[0] - l0)) < 1e-9

    # case 2: prompt
    pids = spm_encode(m.tokens, scores, STORIES_PROMPT_TEXT)
    assert spm_decode(m.tokens, pids) == STORIES_PROMPT_TEXT
    prompt = [bos] + pids
    cache = m.new_cache()
    pl = m.forward(prompt, cache)
    toks2, t1b, t2b = greedy(m, prompt, STORIES_PROMPT_N_GREEDY, cache, first_logits=pl[-1])
    text2 = spm_decode(m.tokens, toks2, strip_prefix_space=False)  # continues the prompt

    def first_eos(ts):
        return ts.index(eos) if eos in ts else None

    doc = {
        "model": os.path.basename(path),
        "sha256": sha256_file(path),
        "generator": "scripts/reference/make_reference.py",
        "precision": "float64 (F32 weights promoted exactly to float64; all arithmetic float64)",
        "bos_id": bos,
        "eos_id": eos,
        "prompt_tokens": [bos],
        "greedy_tokens": toks,
        "greedy_text": text,
        "greedy_first_eos_index": first_eos(toks),
        "greedy_top1_logit": r6(t1),
        "greedy_top2_logit": r6(t2),
        "last_logits_first_step": r6(l0),
        "prompt_case": {
            "prompt_text": STORIES_PROMPT_TEXT,
            "prompt_tokenizer": "SentencePiece BPE by score (llama.cpp SPM style), '▁' prefix, BOS prepended",
            "prompt_tokens": prompt,
            "greedy_tokens": toks2,
            "greedy_text": text2,
            "greedy_first_eos_index": first_eos(toks2),
            "greedy_top1_logit": r6(t1b),
            "greedy_top2_logit": r6(t2b),
            "prompt_logits": [r6(row) for row in pl],
        },
    }
    p = os.path.join(out_dir, "stories260k_greedy.json")
    with open(p, "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {p} ({os.path.getsize(p)} bytes) in {time.time() - t0:.1f}s")
    print("  greedy from BOS:", repr(text[:200]))
    print("  prompt tokens:", prompt)
    print("  prompt continuation:", repr(text2[:200]))


# --------------------------------------------------------------------------
# SmolLM2 (GPT-2 byte-level BPE, "smollm" pre-tokenizer)
# --------------------------------------------------------------------------

def build_bpe_tokenizer(tokens, merges, token_types, split_digits):
    """HF `tokenizers` byte-level BPE from GGUF tokenizer.ggml.tokens/merges."""
    from tokenizers import Tokenizer, AddedToken, models, pre_tokenizers, decoders
    vocab = {}
    for i, t in enumerate(tokens):
        assert t not in vocab, f"duplicate token {t!r}"
        vocab[t] = i
    pairs = []
    for mg in merges:
        a, b = mg.split(" ")
        pairs.append((a, b))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    # GPT-2 byte-level regex, no prefix space. For SmolLM2 (llama.cpp
    # LLAMA_VOCAB_PRE_TYPE_SMOLLM == HF SmolLM2 tokenizer.json) every digit is
    # split off first.
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bl])
                        if split_digits else bl)
    tk.decoder = decoders.ByteLevel()
    # control tokens (type 3) such as <|im_start|> are matched as specials
    if token_types is not None:
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t, ty in zip(tokens, token_types) if int(ty) == 3])
    return tk


VOCAB_TEST_DIR = "/work/shared/models/llama.cpp-vocab"


def check_tokenizers(vdir=VOCAB_TEST_DIR):
    """Validate both tokenizer implementations used here against llama.cpp's
    own tokenizer test vectors (GPT-2 BPE and LLaMA SPM), when available."""
    def cases(name):
        inp = open(os.path.join(vdir, name + ".inp"), encoding="utf-8").read().split("\n__ggml_vocab_test__\n")
        out = open(os.path.join(vdir, name + ".out"), encoding="utf-8").read().split("\n")
        return [(s, [int(x) for x in o.split()]) for s, o in zip(inp, out) if s]

    gp = os.path.join(vdir, "ggml-vocab-gpt-2.gguf")
    sp = os.path.join(vdir, "ggml-vocab-llama-spm.gguf")
    if not (os.path.exists(gp) and os.path.exists(sp)):
        print(f"tokenizer self-check skipped ({vdir} not found)")
        return
    r = gguf.GGUFReader(gp)
    tk = build_bpe_tokenizer(list(r.fields["tokenizer.ggml.tokens"].contents()),
                             list(r.fields["tokenizer.ggml.merges"].contents()), None, False)
    cs = cases("ggml-vocab-gpt-2.gguf")
    for s, exp in cs:
        got = tk.encode(s, add_special_tokens=False).ids
        assert got == exp, f"GPT-2 BPE mismatch on {s!r}: {got} != {exp}"
    r = gguf.GGUFReader(sp)
    toks = list(r.fields["tokenizer.ggml.tokens"].contents())
    sc = [float(x) for x in r.fields["tokenizer.ggml.scores"].contents()]
    cs2 = cases("ggml-vocab-llama-spm.gguf")
    for s, exp in cs2:
        got = spm_encode(toks, sc, s)
        assert got == exp, f"SPM mismatch on {s!r}: {got} != {exp}"
    print(f"tokenizer self-check OK: {len(cs)} GPT-2 BPE and {len(cs2)} SPM llama.cpp test vectors")


def make_smollm(path, text_path, out_dir):
    t0 = time.time()
    m = Model(path)
    print(f"SmolLM2 loaded/dequantized in {time.time() - t0:.1f}s: arch={m.arch} layers={m.n_layer} "
          f"dim={m.n_embd} heads={m.n_head}/{m.n_head_kv} rot={m.n_rot} base={m.rope_base} vocab={m.n_vocab} "
          f"tied={'output.weight' not in m.t}")
    tk = build_bpe_tokenizer(m.tokens, list(m.meta("tokenizer.ggml.merges")),
                             list(m.meta("tokenizer.ggml.token_type")), True)

    with open(text_path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    a, b = SMOLLM_TEXT_LINES
    text = "\n".join(lines[a - 1:b])
    enc = tk.encode(text, add_special_tokens=False)
    ids = enc.ids
    # tokenizer checks: lossless round trip, no special/unknown tokens, and
    # digits split individually
    assert tk.decode(ids, skip_special_tokens=False) == text, "round trip failed"
    assert tk.decode(tk.encode("In 1805 there were 12 of them").ids) == "In 1805 there were 12 of them"
    dig = [m.tokens[i] for i in tk.encode("In 1805").ids]
    assert dig == ["In", "Ġ", "1", "8", "0", "5"], dig
    assert all(i > 16 for i in ids), "unexpected special token in prompt"
    print(f"  prompt: {len(ids)} tokens; first pieces: {[m.tokens[i] for i in ids[:16]]}")

    bos_added = bool(m.meta("tokenizer.ggml.add_bos_token", False))
    assert not bos_added
    prompt = ids
    n = len(prompt)

    t1 = time.time()
    cache = m.new_cache()
    logits = m.forward(prompt, cache)  # [n, vocab] float64
    print(f"  prefill {n} tokens: {time.time() - t1:.1f}s")
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :2]
    top1, top2 = order[:, 0], order[:, 1]
    rows = np.arange(n)
    lpos = sorted(set(p if p >= 0 else n + p for p in SMOLLM_LOGIT_POSITIONS_FRAC))
    full = logits[lpos].astype("<f4")
    binp = os.path.join(out_dir, "smollm2_ref_logits.bin")
    with open(binp, "wb") as f:
        f.write(full.tobytes())

    t2 = time.time()
    gt, g1, g2 = greedy(m, prompt, SMOLLM_N_GREEDY, cache, first_logits=logits[-1])
    print(f"  greedy {SMOLLM_N_GREEDY} tokens: {time.time() - t2:.1f}s")
    gtext = tk.decode(gt, skip_special_tokens=False)

    margin = logits[rows, top1] - logits[rows, top2]
    mx = logits.max(axis=-1, keepdims=True)
    lse = (mx[:, 0] + np.log(np.exp(logits - mx).sum(axis=-1)))
    nll = lse[:-1] - logits[rows[:-1], np.asarray(prompt[1:])]
    doc = {
        "model": os.path.basename(path),
        "sha256": sha256_file(path),
        "generator": "scripts/reference/make_reference.py",
        "precision": ("weights dequantized by gguf.quants.dequantize (GGML-identical float32 values), "
                      "promoted exactly to float64; all arithmetic float64; no activation quantization"),
        "config": {"arch": m.arch, "n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head,
                   "n_head_kv": m.n_head_kv, "head_dim": m.head_dim, "n_rot": m.n_rot,
                   "rope_freq_base": m.rope_base, "rms_eps": m.eps, "n_vocab": m.n_vocab,
                   "tied_output": "output.weight" not in m.t},
        "text_source": {"file": os.path.basename(text_path), "sha256": sha256_file(text_path),
                        "lines": [a, b], "joined_with": "\n"},
        "text": text,
        "tokenizer": ("HF tokenizers BPE built from tokenizer.ggml.tokens/merges; pre-tokenizer "
                      "Digits(individual) + ByteLevel(GPT-2 regex, no prefix space); no BOS"),
        "add_bos": False,
        "n_prompt": n,
        "prompt_tokens": [int(i) for i in prompt],
        "top1_id": [int(i) for i in top1],
        "top2_id": [int(i) for i in top2],
        "top1_logit": r6(logits[rows, top1]),
        "top2_logit": r6(logits[rows, top2]),
        "min_top12_margin": round(float(margin.min()), 6),
        "prompt_mean_nll": round(float(nll.mean()), 6),
        "logits_file": os.path.basename(binp),
        "logits_sha256": sha256_file(binp),
        "logits_dtype": "float32 little-endian",
        "logits_shape": [len(lpos), m.n_vocab],
        "logits_positions": lpos,
        "greedy_tokens": gt,
        "greedy_text": gtext,
        "greedy_top1_logit": r6(g1),
        "greedy_top2_logit": r6(g2),
    }
    p = os.path.join(out_dir, "smollm2_ref.json")
    with open(p, "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {p} ({os.path.getsize(p)} bytes), {binp} ({os.path.getsize(binp)} bytes) "
          f"in {time.time() - t0:.1f}s")
    print(f"  prompt mean NLL {nll.mean():.4f} (ppl {np.exp(nll.mean()):.2f})")
    print(f"  min top1-top2 margin over prompt positions: {margin.min():.4f} at {int(margin.argmin())}")
    print(f"  greedy continuation: {gtext!r}")
    print(f"  greedy margins: {[round(x - y, 3) for x, y in zip(g1, g2)]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stories", default=DEFAULT_STORIES)
    ap.add_argument("--smollm", default=DEFAULT_SMOLLM)
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--out", default=os.path.join(REPO, "tests", "data"))
    ap.add_argument("--only", choices=["stories", "smollm"])
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    check_tokenizers()
    if args.only in (None, "stories"):
        make_stories(args.stories, args.out)
    if args.only in (None, "smollm"):
        make_smollm(args.smollm, args.text, args.out)
    print(f"total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
