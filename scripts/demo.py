#!/usr/bin/env python3
"""The main job: a long-context question on the default model, answered with the full 16-bit
KV cache and with SpeCache (2-bit and 1-bit copies + speculative top-k prefetch), and with
SpeCache's non-speculative variant (1-bit copy, the real token's own top-k fetched at once),
side by side.

Prints the answers, their token agreement, fast-tier KV bytes, peak RSS and decode speed.
Then (--batch N, default 4) N questions about the same document generated together, with full
and with specache:1 on the file store, the document's cache held once for all of them: tokens per
second over the batch and peak RSS.
Usage: scripts/demo.py SPECACHE_BINARY MODEL.gguf [--tokens N] [--threads T] [--store host|file] [--batch N]
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BOOK = os.path.join(HERE, "..", "..", "shared", "data", "gutenberg", "pg2600-war-and-peace.txt")
NEEDLE = "The special magic number mentioned in this book is 7431."
QUESTION = "What is the special magic number mentioned in this book?"
ANSWER_PREFIX = "The special magic number mentioned in this book is"
ANSWER = "7431"


def haystack(n_chars: int) -> tuple[str, str]:
    """Real text from War and Peace when ../shared is present, else a synthetic ledger."""
    if os.path.exists(BOOK):
        text = open(BOOK, encoding="utf-8").read()
        start = text.find("CHAPTER I")
        return text[start:start + n_chars], "War and Peace (../shared/data/gutenberg)"
    rng = random.Random(7)
    towns = ["Arden", "Bristow", "Calder", "Dunmore", "Elmsworth", "Fairhaven", "Glenrock", "Hollins"]
    goods = ["wool", "grain", "salt", "timber", "copper", "linen", "cider", "iron"]
    lines = []
    while sum(len(s) for s in lines) < n_chars:
        lines.append(f"On day {len(lines) + 1} the cart from {rng.choice(towns)} brought {rng.randint(2, 90)} "
                     f"sacks of {rng.choice(goods)}, and the clerk wrote it down in the ledger.\n")
    return "".join(lines)[:n_chars], "synthetic ledger (../shared absent)"


def run(binary, model, prompt_file, spec, threads, store, kv_dir):
    policy, _, bits = spec.partition(":")
    cmd = [binary, "generate", "-m", model, "-f", prompt_file, "-n", "48", "--temp", "0",
           "-t", str(threads), "--json", "--kv", policy]
    if policy.startswith("specache"):
        cmd += ["--kv-bits", bits, "--kv-store", store] + (["--kv-dir", kv_dir] if store == "file" else [])
    t0 = time.time()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    res = json.loads(out.stdout)
    res["wall_s"] = time.time() - t0
    return res


OTHER_QUESTIONS = ["Who is Anna Pavlovna?", "In which city does this part of the story take place?",
                   "Which emperor do the guests talk about?", "Who arrives at the reception first?",
                   "What does the prince say about the war?", "Who is Prince Vasili?", "What is the weather like?"]


def run_batch(binary, model, prompt_files, spec, threads, kv_dir):
    """Several prompts generated together (one decode step for all sequences); their shared
    beginning (the document) is prefilled once."""
    policy, _, bits = spec.partition(":")
    cmd = [binary, "generate", "-m", model, "-n", "32", "--temp", "0", "-t", str(threads), "--json", "--kv", policy]
    for f in prompt_files:
        cmd += ["-f", f]
    if policy.startswith("specache"):
        cmd += ["--kv-bits", bits, "--kv-store", "file", "--kv-dir", kv_dir]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=6000, help="approximate prompt length in tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--store", default="host", choices=["host", "file"])
    ap.add_argument("--policies", default="full,specache:2,specache:1,specache-refetch:1,specache-exact:1",
                    help="comma-separated policy[:bits] list; the first must be full (the reference)")
    ap.add_argument("--batch", type=int, default=4,
                    help="then this many questions about the document generated together with full and with "
                         "specache:1 on the file store (0: skip)")
    a = ap.parse_args()

    text, source = haystack(a.tokens * 4)  # ~4 characters per token for English prose
    cut = int(len(text) * 0.4)
    cut = text.find(". ", cut) + 2 if text.find(". ", cut) > 0 else cut
    doc = text[:cut] + NEEDLE + " " + text[cut:]
    # SmolLM2's ChatML turn written out, so the assistant's answer can start with a prefix
    # (special tokens in the prompt are parsed, as with llama.cpp).
    prompt = (f"<|im_start|>user\n{doc}\n\n{QUESTION}<|im_end|>\n"
              f"<|im_start|>assistant\n{ANSWER_PREFIX}")
    with tempfile.TemporaryDirectory() as tmp:
        pf = os.path.join(tmp, "prompt.txt")
        open(pf, "w", encoding="utf-8").write(prompt)
        print(f"prompt: {source}, needle at 40% depth, question: {QUESTION}", flush=True)
        results = {}
        policies = a.policies.split(",")
        if policies[0] != "full":
            sys.exit("demo.py: --policies must start with full (the reference the others are compared with)")
        for policy in policies:
            print(f"running --kv {policy} ...", flush=True)
            results[policy] = run(a.binary, a.model, pf, policy, a.threads, a.store, tmp)
        batch = {}
        if a.batch > 0:
            questions = [QUESTION] + (OTHER_QUESTIONS * a.batch)[:a.batch - 1]
            files = []
            for i, q in enumerate(questions):
                files.append(os.path.join(tmp, f"batch{i}.txt"))
                head = ANSWER_PREFIX if i == 0 else ""
                open(files[-1], "w", encoding="utf-8").write(
                    f"<|im_start|>user\n{doc}\n\n{q}<|im_end|>\n<|im_start|>assistant\n{head}")
            for spec in ("full", "specache:1"):
                print(f"running {a.batch} questions together, --kv {spec} ...", flush=True)
                batch[spec] = run_batch(a.binary, a.model, files, spec, a.threads, tmp)

    full = results["full"]
    print()
    t0 = full['timings']
    print(f"prompt tokens: {len(full['prompt_tokens'])}, matmul activations: prefill {t0.get('prefill_act', 'fp32')}, "
          f"decode {t0['decode_act']}; prefill attention {t0.get('prefill_attn', 'fp32')}")
    for name, r in results.items():
        kv, t = r["kv"], r["timings"]
        print(f"[{name:16s}] answer: {r['text'].strip()[:100]!r}")
        print(f"                   fast-tier KV {kv['fast_bytes'] / 2**20:7.2f} MiB, slow tier {kv['slow_bytes'] / 2**20:7.2f} MiB, "
              f"peak RSS {r['memory']['peak_rss_bytes'] / 2**20:.0f} MiB, prefill {t['prefill_tok_per_s']:.0f} tok/s, "
              f"decode {t['decode_ms_per_token']:.2f} ms/token")
    print()
    for name, r in results.items():
        if name == "full":
            continue
        n = min(len(full["tokens"]), len(r["tokens"]))
        same = sum(1 for i in range(n) if full["tokens"][i] == r["tokens"][i])
        prefix = next((i for i in range(n) if full["tokens"][i] != r["tokens"][i]), n)
        ratio = r["kv"]["fast_bytes"] / max(1, full["kv"]["fast_bytes"])
        spec = (f"speculative top-k recall {r['kv']['spec_recall']:.2f}, " if name.startswith("specache:") else "")
        print(f"{name}: fast-tier KV = {100 * ratio:.1f}% of the full cache; greedy agreement with full "
              f"{same}/{n} tokens ({prefix} identical in a row); {spec}prefetch reuse "
              f"{r['kv']['prefetch_reuse_rate']:.2f}, stall {r['kv']['stall_ms']:.1f} ms")
    found = ", ".join(f"{k}={ANSWER in r['text']}" for k, r in results.items())
    print(f"needle ({ANSWER}) retrieved: {found}")
    if batch:
        print()
        print(f"{a.batch} questions about the document generated together (the document prefilled once and its KV "
              f"cache held once, shared by the {a.batch} sequences; one decode step for all of them; specache:1 "
              f"with its 16-bit cache in a file):")
        for name, b in batch.items():
            t, kv = b["timings"], b["kv"]
            label = name + (" (file)" if name != "full" else "")
            print(f"[{label:17s}] {t['decode_tok_per_s']:6.1f} tok/s over the batch, peak RSS "
                  f"{b['memory']['peak_rss_bytes'] / 2**20:.0f} MiB, fast-tier KV {kv['fast_bytes'] / 2**20:.1f} MiB "
                  f"held ({kv.get('shared_bytes', 0) / 2**20:.1f} MiB more read through the shared document); "
                  f"prefilled {t['prefill_tokens']} of {t['prefill_tokens'] + t['prefill_shared_tokens']} prompt tokens")
            single = results.get(name)
            if single is not None:
                n = len(b["results"][0]["tokens"])
                same = b["results"][0]["tokens"] == single["tokens"][:n]
                print(f"{'':20s}needle answer {ANSWER in b['results'][0]['text']}; equals the separate run's first "
                      f"{n} tokens: {same}")
        if "full" in batch and "specache:1" in batch:
            f, s1 = batch["full"], batch["specache:1"]
            print(f"specache:1 batch: {s1['timings']['decode_tok_per_s'] / f['timings']['decode_tok_per_s']:.2f}x "
                  f"full's tokens per second in {s1['memory']['peak_rss_bytes'] / f['memory']['peak_rss_bytes']:.2f}x "
                  f"its peak RSS")


if __name__ == "__main__":
    sys.exit(main())
