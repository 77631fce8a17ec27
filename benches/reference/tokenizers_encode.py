"""Tokenization throughput of Hugging Face `tokenizers` in Python, the baseline of
`moe data prepare` (docs/performance.md). Both run the same Rust tokenizer underneath.

    pip install tokenizers
    RAYON_NUM_THREADS=2 python benches/reference/tokenizers_encode.py \
        --tokenizer DIR/tokenizer.json --input corpus.jsonl

Reads JSON lines (field `text`) or plain text files (one document each), encodes every
document with `Tokenizer.encode_batch` in batches of about 16 MB (the batch size of
`moe data prepare`), and prints the text throughput in MB/s. Only the encoding is timed:
reading the input and writing no output are left out, which favours this side.
"""

import argparse
import json
import time

from tokenizers import Tokenizer


def documents(paths):
    for path in paths:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)["text"]
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--batch-bytes", type=int, default=16 << 20)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(args.tokenizer)
    batches, batch, size = [], [], 0
    for doc in documents(args.input):
        batch.append(doc)
        size += len(doc.encode("utf-8"))
        if size >= args.batch_bytes:
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)
    total = sum(len(d.encode("utf-8")) for b in batches for d in b)
    start = time.perf_counter()
    tokens = 0
    for b in batches:
        tokens += sum(len(e.ids) for e in tokenizer.encode_batch(b, add_special_tokens=False))
    secs = time.perf_counter() - start
    print(f"{total / 1e6:.1f} MB, {tokens} tokens in {secs:.2f}s: {total / 1e6 / secs:.2f} MB/s")


if __name__ == "__main__":
    main()
