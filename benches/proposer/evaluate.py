#!/usr/bin/env python3
"""Score a chat model served over the OpenAI API on the proposer test set.

Sends each test conversation, without its assistant answer, to
POST {base-url}/chat/completions (greedy, a few tokens) and counts exact matches per
task: the first line of the reply and the expected answer are compared after
stripping, case-folding and dropping trailing punctuation. The baseline row is what
always giving each task's most frequent train answer (from summary.json, written next to
test.jsonl by make_instructions.py) would score. A failed request counts as wrong and
is reported. Prints a markdown table; --json writes a summary.

Standard library only.
"""

import argparse
import collections
import json
import string
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def normalise(text):
    """First line, stripped, case-folded, without trailing punctuation or spaces."""
    lines = text.strip().splitlines()
    first = " ".join(lines[0].split()) if lines else ""
    return first.casefold().rstrip(string.punctuation + " ")


def ask(base_url, model, messages, max_tokens, timeout, api_key):
    """The assistant's reply to `messages` (greedy)."""
    body = json.dumps({
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
    }).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        base_url.rstrip("/") + "/chat/completions", data=body, headers=headers
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        reply = json.load(response)
    return reply["choices"][0]["message"]["content"] or ""


def error_text(error):
    """A one-line description of a failed request, with the server's message if any."""
    if isinstance(error, urllib.error.HTTPError):
        try:
            detail = json.loads(error.read())["error"]["message"]
        except Exception:  # noqa: BLE001 - any body at all
            detail = error.reason
        return f"HTTP {error.code}: {detail}"
    return f"{type(error).__name__}: {error}"


def table(rows):
    """A markdown table of (name, {task: (correct, total)}) rows."""
    tasks = sorted({t for _, scores in rows for t in scores if t != "overall"})
    columns = tasks + ["overall"]
    out = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, scores in rows:
        cells = []
        for t in columns:
            right, total = scores.get(t, (0, 0))
            cells.append(f"{100 * right / total:.1f}% ({right}/{total})" if total else "-")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def tally(results, key):
    """{task: (correct, total)} and 'overall', counting `key(result)` as correct."""
    scores = collections.defaultdict(lambda: [0, 0])
    for r in results:
        for t in (r["task"], "overall"):
            scores[t][0] += bool(key(r))
            scores[t][1] += 1
    return {t: tuple(v) for t, v in scores.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--model", default="any")
    parser.add_argument("--test", type=Path, default=Path("target/proposer/test.jsonl"))
    parser.add_argument("--summary", type=Path,
                        help="make_instructions.py's summary.json (default: next to --test)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=60, help="seconds per request")
    parser.add_argument("--limit", type=int, help="score only the first N examples")
    parser.add_argument("--api-key", default="", help="sent as a bearer token if given")
    parser.add_argument("--json", type=Path, help="write a JSON summary here")
    parser.add_argument("--show", type=int, default=3,
                        help="print this many sample answers per task (default 3)")
    args = parser.parse_args()

    examples = [json.loads(line) for line in args.test.open(encoding="utf-8") if line.strip()]
    examples = examples[: args.limit] if args.limit else examples
    summary_path = args.summary or args.test.with_name("summary.json")
    majority = {}
    if summary_path.exists():
        majority = json.loads(summary_path.read_text())["most_frequent_train_answer"]
    else:
        print(f"note: {summary_path} not found, no baseline", file=sys.stderr)

    results, errors = [], collections.Counter()
    started = time.monotonic()
    for i, example in enumerate(examples):
        messages = [m for m in example["messages"] if m["role"] != "assistant"]
        try:
            reply = ask(args.base_url, args.model, messages, args.max_tokens,
                        args.timeout, args.api_key)
            error = None
        except Exception as e:  # noqa: BLE001 - a failed request is a wrong answer
            reply, error = "", error_text(e)
            errors[error] += 1
        results.append({
            "task": example["task"],
            "answer": example["answer"],
            "reply": reply,
            "error": error,
            "correct": error is None and normalise(reply) == normalise(example["answer"]),
        })
        if (i + 1) % 50 == 0:
            print(f"{i + 1}/{len(examples)} in {time.monotonic() - started:.0f} s",
                  file=sys.stderr)
    seconds = time.monotonic() - started

    shown = collections.Counter()
    for r in results:
        if shown[r["task"]] < args.show:
            shown[r["task"]] += 1
            mark = "ok" if r["correct"] else "--"
            print(f"{mark} [{r['task']}] expected {r['answer']!r}, got {r['reply']!r}")
    model_scores = tally(results, lambda r: r["correct"])
    rows = [(f"model at {args.base_url}", model_scores)]
    baseline_scores = None
    if majority:
        baseline_scores = tally(
            results, lambda r: normalise(majority.get(r["task"], "")) == normalise(r["answer"])
        )
        rows.append(("baseline: most frequent train answer", baseline_scores))
    print()
    print(table(rows))
    if majority:
        print("\nbaseline answers: " + "; ".join(f"{t}: {a!r}" for t, a in sorted(majority.items())))
    print(f"\n{len(results)} requests in {seconds:.1f} s; {sum(errors.values())} failed")
    for error, n in errors.most_common(5):
        print(f"  {n} x {error}")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "base_url": args.base_url,
            "test": str(args.test),
            "seconds": round(seconds, 1),
            "failed_requests": sum(errors.values()),
            "errors": dict(errors),
            "accuracy": {t: c / n for t, (c, n) in model_scores.items()},
            "counts": model_scores,
            "baseline_accuracy": (
                {t: c / n for t, (c, n) in baseline_scores.items()} if baseline_scores else None
            ),
            "baseline_answers": majority,
            "results": results,
        }, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
