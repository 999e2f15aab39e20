#!/usr/bin/env python3
"""Independent reference ids for SmolLM2's tokenizer (tests/data/smollm2_tokenizer_ref.json).

Builds a Hugging Face `tokenizers` byte-level BPE from the GGUF's own tokenizer.ggml.tokens and
tokenizer.ggml.merges, with SmolLM2's pre-tokenizer (tokenizer.json: Sequence[Digits(individual_digits=True),
ByteLevel(add_prefix_space=False, use_regex=True)]), and encodes a set of varied strings without special tokens.

usage: smollm2_tokenizer_ref.py [MODEL.gguf] > tests/data/smollm2_tokenizer_ref.json
(needs: pip install gguf tokenizers; /opt/specache-venv has both)
"""
import json
import os
import sys

from gguf import GGUFReader
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

CASES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "1234567",
    "Call 555-0199 or +1 (800) 123 4567 by 2024-12-31.",
    "def add(a, b):\n    return a + b\n",
    "int main() { std::vector<int> v{1, 2, 3}; return v[0]; }",
    "caf\u00e9 na\u00efve \u00fcber \u00c5ngstr\u00f6m",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01 \u3053\u3093\u306b\u3061\u306f \U0001F999\U0001F680 \u2705",
    "multiple   spaces\there\t\tand  trailing   ",
    "line one\nline two\n\n\nline five\r\nwindows",
    "I'm sure they'll say it's fine, we've done what you'd do.",
    "   leading spaces and a final newline\n",
    "<not_special> <|im_start|is not closed",
    "\u00a0non-breaking\u2009thin\u3000ideographic",
]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/specache/SmolLM2-135M-Instruct.Q4_1.gguf")
    r = GGUFReader(path)

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()

    cases = []
    for text in CASES:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text, text
        cases.append({"text": text, "ids": ids})
    out = sys.stdout
    out.write('{"model": %s,\n "generator": "scripts/reference/smollm2_tokenizer_ref.py",\n "cases": [\n'
              % json.dumps(os.path.basename(path)))
    out.write(",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases))
    out.write("\n ]}\n")


if __name__ == "__main__":
    main()
