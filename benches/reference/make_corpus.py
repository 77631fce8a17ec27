"""Writes a large JSON-lines corpus for the data benchmarks (docs/performance.md):
documents of 2 to 40 paragraphs drawn at random (seeded) from the shipped Shakespeare
works, until the file holds --gigabytes of text.

    python benches/reference/make_corpus.py --gigabytes 2 --out /tmp/corpus.jsonl
"""

import argparse
import json
import pathlib
import random


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gigabytes", type=float, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = pathlib.Path(__file__).resolve().parents[2] / "datasets" / "shakespeare"
    paragraphs = [
        p
        for f in sorted(root.glob("*.txt"))
        for p in f.read_text(encoding="utf-8").split("\n\n")
        if p.strip()
    ]
    rng = random.Random(args.seed)
    target, written = int(args.gigabytes * 1e9), 0
    with open(args.out, "w", encoding="utf-8") as out:
        while written < target:
            text = "\n\n".join(rng.choices(paragraphs, k=rng.randint(2, 40)))
            out.write(json.dumps({"text": text}) + "\n")
            written += len(text.encode("utf-8"))
    print(f"{written / 1e9:.2f} GB of text in {args.out}")


if __name__ == "__main__":
    main()
