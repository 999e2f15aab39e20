#!/usr/bin/env python3
"""Peer comparison: llama.cpp (through llama-cpp-python) against `specache bench --policies full`.

Same GGUF, same prompt length (depth), same thread count, greedy decode of --gen tokens. specache
runs twice: with --act int8 (int8 activations, what llama.cpp's CPU matmuls use, and
specache's default for quantized models on SIMD builds; the prompt's matmuls too where the build has
the interleaved int8 kernels, AVX-512 VNNI) and with --act fp32 (--no-fp32 skips that row). Prints all
side by side and writes a JSON file. Not part of CI: the first run creates a throwaway venv and
pip-installs llama-cpp-python, which compiles llama.cpp from source (several minutes on 2 cores).

  python3 scripts/bench_llamacpp.py --depths 2048 --threads 2 --json /tmp/peer.json

The build uses CMAKE_ARGS from the environment when set (default: -DGGML_NATIVE=ON ...). On a
Xeon with AMX (session 19) llama-cpp-python 0.3.36's native build crashed on its first batch in
ggml's AMX matmul (a general-protection fault at ldtilecfg); a build without AMX ran:

  python3 -m venv /tmp/llamacpp-noamx
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
    -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" \
    /tmp/llamacpp-noamx/bin/python -m pip install --no-cache-dir llama-cpp-python numpy
  python3 scripts/bench_llamacpp.py --venv /tmp/llamacpp-noamx --depths 2048 --threads 2

(--no-cache-dir: pip otherwise reuses the wheel it built with the earlier CMAKE_ARGS.)

What is measured on the llama.cpp side (mirrors specache bench, see docs/BENCHMARKS.md):
  prefill: one llm.eval(prompt) of `depth` tokens on a fresh context (n_batch tokens per call into
           llama_decode), wall time by time.perf_counter;
  decode:  --gen single-token llm.eval([argmax]) calls, each timed by perf_counter; the first
           --warmup are left out; median / p25 / p75 / min / max over the rest. The argmax itself is
           outside the timed region. llama.cpp's own llama_perf_context counters are recorded too.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_MODEL = os.path.expanduser("~/.cache/specache/SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_TEXT = os.path.join(ROOT, "..", "shared", "data", "gutenberg", "pg2600-war-and-peace.txt")
DEFAULT_VENV = "/tmp/specache-llamacpp-venv"


def ensure_venv(venv):
    """Re-executes this script inside a venv that has llama_cpp, creating it if needed."""
    try:
        import llama_cpp  # noqa: F401
        return
    except ImportError:
        pass
    py = os.path.join(venv, "bin", "python")
    if os.environ.get("SPECACHE_PEER_REEXEC") == "1":
        sys.exit(f"llama_cpp still not importable inside {venv}; see the pip output above")
    if not os.path.exists(py):
        print(f"creating venv {venv}", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "venv", venv])
    ok = subprocess.call([py, "-c", "import llama_cpp"], stderr=subprocess.DEVNULL) == 0
    if not ok:
        print("pip install llama-cpp-python (compiles llama.cpp; this takes several minutes)", file=sys.stderr)
        env = dict(os.environ)
        env.setdefault("CMAKE_ARGS", "-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF")
        subprocess.check_call([py, "-m", "pip", "install", "llama-cpp-python", "numpy"], env=env)
    env = dict(os.environ, SPECACHE_PEER_REEXEC="1")
    os.execve(py, [py, os.path.abspath(__file__)] + sys.argv[1:], env)


def spread(xs):
    xs = sorted(xs)
    if not xs:
        return {"median": 0, "p25": 0, "p75": 0, "min": 0, "max": 0, "samples": 0}
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "min": xs[0], "max": xs[-1], "samples": len(xs)}


def prompt_tokens(llm, text_path, depth):
    toks = []
    if text_path and os.path.exists(text_path):
        with open(text_path, "rb") as f:
            text = f.read()
        pos = 0
        while len(toks) < depth:
            end = text.find(b"\n", min(len(text), pos + 16384))
            end = len(text) if end < 0 else end + 1
            toks += llm.tokenize(text[pos:end], add_bos=(not toks), special=False)
            pos = 0 if end >= len(text) else end
        return toks[:depth], "text:" + os.path.abspath(text_path)
    n_vocab = llm.n_vocab()
    return [i % n_vocab for i in range(depth)], "synthetic"


def bench_llamacpp(args, depth, threads):
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=args.model, n_ctx=depth + args.gen + 16, n_threads=threads, n_threads_batch=threads,
                n_batch=args.n_batch, n_ubatch=args.n_batch, logits_all=False, verbose=False)
    toks, source = prompt_tokens(llm, args.prompt_file, depth)
    n_vocab = llm.n_vocab()

    def last_argmax():
        # The last evaluated token's logits straight from the context (recent llama-cpp-python no
        # longer copies them into llm.scores unless logits_all=True).
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))
    prefill_ms = []
    decode_ms = []
    perf = None
    for _ in range(args.reps):
        llm.reset()
        try:
            llama_cpp.llama_perf_context_reset(llm.ctx)
        except Exception:
            pass
        t0 = time.perf_counter()
        llm.eval(toks)
        prefill_ms.append((time.perf_counter() - t0) * 1e3)
        for i in range(args.gen):
            nxt = last_argmax()
            t0 = time.perf_counter()
            llm.eval([nxt])
            dt = (time.perf_counter() - t0) * 1e3
            if i >= min(args.warmup, args.gen - 1):
                decode_ms.append(dt)
        try:
            p = llama_cpp.llama_perf_context(llm.ctx)
            perf = {"t_p_eval_ms": p.t_p_eval_ms, "n_p_eval": p.n_p_eval, "t_eval_ms": p.t_eval_ms, "n_eval": p.n_eval}
        except Exception:
            perf = None
    pf = statistics.median(prefill_ms)
    return {
        "engine": "llama.cpp",
        "version": getattr(llama_cpp, "__version__", "?"),
        "depth": depth,
        "threads": threads,
        "n_batch": args.n_batch,
        "prompt": source,
        "prefill_ms": pf,
        "prefill_tok_per_s": depth * 1e3 / pf,
        "decode_ms_per_token": spread(decode_ms),
        "llama_perf_context": perf,
    }


def bench_specache(args, depth, threads, act):
    out = f"/tmp/specache-peer-{os.getpid()}-{depth}-{threads}.json"
    cmd = [args.specache, "bench", "-m", args.model, "--policies", "full", "--depths", str(depth), "-t", str(threads),
           "--gen", str(args.gen), "--warmup", str(args.warmup), "--reps", str(args.reps), "--json", out,
           "--act", act]
    if args.prompt_file and os.path.exists(args.prompt_file):
        cmd += ["--prompt-file", args.prompt_file]
    else:
        cmd += ["--synthetic"]
    print("running:", " ".join(cmd), file=sys.stderr)
    subprocess.check_call(cmd, stdout=subprocess.DEVNULL)
    with open(out) as f:
        rep = json.load(f)
    os.unlink(out)
    row = rep["rows"][0]
    return {
        "engine": "specache" if act == "int8" else "specache-f32",
        "version": rep["build"]["git_commit"],
        "decode_act": rep.get("decode_act", "fp32"),
        "prefill_act": rep.get("prefill_act", "fp32"),
        "depth": depth,
        "threads": threads,
        "prompt": rep["prompt"]["kind"],
        "prefill_ms": row["prefill_ms"],
        "prefill_tok_per_s": row["prefill_tok_per_s"],
        "decode_ms_per_token": row["decode_ms_per_token"],
        "bytes_per_token": row["bytes_per_token"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=DEFAULT_MODEL)
    ap.add_argument("--depths", default="2048", help="comma-separated prompt lengths")
    ap.add_argument("-t", "--threads", default="2", help="comma-separated thread counts")
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--n-batch", type=int, default=512, help="llama.cpp n_batch / n_ubatch for the prefill")
    ap.add_argument("--prompt-file", default=DEFAULT_TEXT)
    ap.add_argument("--specache", default=os.path.join(ROOT, "build", "specache"))
    ap.add_argument("--venv", default=DEFAULT_VENV)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--skip-specache", action="store_true")
    ap.add_argument("--no-fp32", action="store_true",
                    help="skip the specache row with --act fp32 (fp32 decode activations)")
    args = ap.parse_args()
    ensure_venv(args.venv)

    results = []
    for t in [int(x) for x in args.threads.split(",")]:
        for d in [int(x) for x in args.depths.split(",")]:
            print(f"llama.cpp: depth {d}, {t} thread(s)", file=sys.stderr)
            results.append(bench_llamacpp(args, d, t))
            if not args.skip_specache:
                results.append(bench_specache(args, d, t, "int8"))
                if not args.no_fp32:
                    results.append(bench_specache(args, d, t, "fp32"))

    print(f"{'engine':<10} {'depth':>6} {'thr':>3} {'prefill tok/s':>14} {'decode ms/tok':>14} {'p25 .. p75':>18} {'tok/s':>7}")
    for r in results:
        dm = r["decode_ms_per_token"]
        print(f"{r['engine']:<10} {r['depth']:>6} {r['threads']:>3} {r['prefill_tok_per_s']:>14.1f} {dm['median']:>14.3f} "
              f"{dm['p25']:>8.3f} .. {dm['p75']:<8.3f} {1e3 / dm['median'] if dm['median'] else 0:>7.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "gen": args.gen, "warmup": args.warmup, "reps": args.reps,
                       "machine": platform.processor() or platform.machine(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
