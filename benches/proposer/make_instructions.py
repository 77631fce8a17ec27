#!/usr/bin/env python3
"""Derive a small chat instruction set from the Shakespeare corpus.

Three tasks, each with a short answer that can be checked exactly:

  play       "Which Shakespeare work is this passage from?" + 2-4 lines -> the title
  speaker    "Who speaks these lines in <title>?" + a speech -> the speaker, e.g. "Hamlet"
  next_word  "What is the next word of this passage from <title>?" + text -> one word

Each work is cut into units (speeches in the plays, stanzas in the poems), the units
into 20 blocks by position, and 2 blocks per work (chosen with the seed) are the test
split: no unit, so no passage, is in both splits. Writes, under --out:

  train.jsonl   {"messages": [system, user, assistant]} per line
  test.jsonl    the same, plus "task" and "answer" for the evaluator
  summary.json  counts per task and split, and the most frequent train answer per task

Standard library only. The output depends only on the corpus and --seed.
"""

import argparse
import collections
import json
import random
import re
from pathlib import Path

SYSTEM = "Answer with the answer only."
BLOCKS = 20  # position blocks per work
TEST_BLOCKS = 2  # of which this many are held out: a 90/10 split by position
# Longest user + assistant text kept. The 4096-token BPE makes ~2.5 characters a token
# of this text, and ChatML markers cost ~20 tokens a message: 400 characters stays under
# ~200 of the model's 256 tokens (the longest example now is ~190).
MAX_CHARS = 400
MIN_SPEECHES = 15  # a speaker needs this many speeches in a play to be asked about
GROUP_TAGS = {"All", "Both", "Omnes", "Lords", "Citizens", "Servants"}
HEADING = re.compile(
    r"^\s*(ACT|Act|SCENE|Scene|PROLOGUE|THE PROLOGUE|EPILOGUE|INDUCTION)\b"
)
ROMAN = re.compile(r"^\s*[IVXLC]+\.?\s*$")
TAG = re.compile(r"^([A-Z][A-Za-z'\-]*\.?)( [A-Za-z][A-Za-z'\-]*\.?){0,3}$")


def read_titles(corpus):
    """Map file stem -> title, from the table in SOURCE.md."""
    titles = {}
    for line in (corpus / "SOURCE.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].endswith(".txt"):
            titles[cells[0][: -len(".txt")]] = cells[1]
    return titles


def clean_lines(path):
    """The work's lines, without its title lines and stage directions."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines[:6]):  # skip the title and "by William Shakespeare"
        if line.strip().lower() == "by william shakespeare":
            lines = lines[i + 1 :]
            break
    out, in_direction = [], False
    for line in lines:
        text = line.strip()
        if in_direction or text.startswith("["):
            in_direction = bool(text) and not ("]" in text or "}" in text)
            out.append("")  # a direction ends a run of verse like a blank line
            continue
        out.append(line.rstrip())
    return out


def tag_candidates(lines):
    """Lines that look like a speaker's name: alone after a blank line, before text."""
    for i in range(1, len(lines) - 1):
        text = lines[i].strip()
        if (
            not lines[i - 1].strip()
            and lines[i + 1].strip()
            and lines[i] == text
            and len(text) <= 30
            and TAG.match(text)
            and not HEADING.match(text)
            and text.upper() != "THE END"
        ):
            yield i, text


def is_tag(line, frequent):
    """A speaker's name: one of the play's frequent ones, or any in capitals."""
    if line in frequent:
        return True
    return (
        len(line) <= 30
        and TAG.match(line) is not None
        and line.upper() == line
        and not ROMAN.match(line)
        and not HEADING.match(line)
        and line != "THE END"
    )


def name_case(tag):
    """'LADY MACBETH.' -> 'Lady Macbeth', 'DROMIO OF EPHESUS.' -> 'Dromio of Ephesus'."""
    words = tag.rstrip(".").split()
    return " ".join(w.lower() if i and w.lower() in ("of", "and") else w.capitalize()
                    for i, w in enumerate(words))


def expand(name, known_words):
    """Expand an abbreviated speaker ('Ham' -> 'Hamlet') with the play's list of persons.

    A name of several words, a listed word or a word of 6 letters or more is kept; a
    shorter one becomes the one listed word it begins (or, failing any, whose first 3
    letters it shares), if there is exactly one; else None (not asked about)."""
    if " " in name or name.lower() in known_words or len(name) >= 6:
        return name
    for prefix in (name.lower(), name.lower()[:3]):  # 'Glou' is listed as 'Gloster'
        matches = {w for w in known_words if w.startswith(prefix)}
        if matches:
            return matches.pop().capitalize() if len(matches) == 1 else None
    return None


def parse_play(lines, tags):
    """Speeches as (speaker tag, [lines]), in order; a heading ends a speech."""
    starts = {i: t for i, t in tags}
    units, current = [], None
    for i, line in enumerate(lines):
        if i in starts:
            current = (starts[i], [])
            units.append(current)
        elif HEADING.match(line) or (line.strip() and line.strip().upper() == "THE END"):
            current = None
        elif current is not None and line.strip():
            current[1].append(line.strip())
    return [u for u in units if u[1]]


def parse_poem(lines):
    """Stanzas as (None, [lines]), skipping headings: numerals and all-capital lines."""
    units, current = [], []
    for line in lines + [""]:
        text = line.strip()
        if not text or ROMAN.match(text) or (text.upper() == text and text.isalpha()):
            if current:
                units.append((None, current))
            current = []
        elif text.upper() != text:  # all-capital lines are headings
            current.append(text)
    return units


def load_work(path):
    """A work's units and, for a play, the speaker names worth asking about."""
    lines = clean_lines(path)
    first = next((i for i, line in enumerate(lines) if HEADING.match(line)), None)
    if first is None:  # no act or scene headings: a poem
        return parse_poem(lines), {}
    # The list of persons comes before the first heading ("SCENE: Elsinore."); the
    # speeches after it.
    candidates = collections.Counter(t for i, t in tag_candidates(lines) if i > first)
    frequent = {t for t, n in candidates.items() if n >= 3}
    tags = [(i, line) for i, line in enumerate(lines) if i > first and is_tag(line, frequent)]
    persons = " ".join(lines[:first])
    known = {w.lower() for w in re.findall(r"[A-Za-z]+", persons) if w[0].isupper()}
    units = parse_play(lines, tags)
    speeches = collections.Counter(t for t, _ in units)
    names = {}
    for tag, n in speeches.items():
        name = expand(name_case(tag), known) if n >= MIN_SPEECHES else None
        if name and name not in GROUP_TAGS:
            names[tag] = name
    return units, names


def examples_for_unit(task, unit, title, names, rng):
    """One (user, answer) example of `task` from a unit, or None if it does not fit."""
    speaker, lines = unit
    if task == "play":
        if len(lines) < 2:
            return None
        n = rng.randint(2, min(4, len(lines)))
        start = rng.randint(0, len(lines) - n)
        passage = "\n".join(lines[start : start + n])
        if len(passage) < 60:
            return None
        return "Which Shakespeare work is this passage from?\n\n" + passage, title
    if task == "speaker":
        if speaker not in names:
            return None
        passage = "\n".join(lines[:4])
        if len(passage) < 40:
            return None
        return f"Who speaks these lines in {title}?\n\n{passage}", names[speaker]
    if task == "next_word":
        if len(lines) < 2:
            return None
        i = rng.randint(1, len(lines) - 1)
        words = lines[i].split()
        if len(words) < 2:
            return None
        k = rng.randint(1, len(words) - 1)
        answer = words[k].strip(".,;:!?'\"()-")
        if not re.fullmatch(r"[A-Za-z]+('[A-Za-z]+)?", answer):
            return None
        context = "\n".join(lines[max(0, i - 2) : i] + [" ".join(words[:k])])
        return f"What is the next word of this passage from {title}?\n\n{context}", answer
    raise ValueError(task)


TASKS = ("play", "speaker", "next_word")


def make_examples(units, title, names, split_of_unit, per_split, rng):
    """Up to per_split[split] examples per task, from the units of that split."""
    out = []
    for task in TASKS:
        for split, limit in per_split.items():
            order = [i for i in range(len(units)) if split_of_unit[i] == split]
            rng.shuffle(order)
            taken = 0
            for i in order:
                if taken == limit:
                    break
                ex = examples_for_unit(task, units[i], title, names, rng)
                if ex and len(ex[0]) + len(ex[1]) + len(SYSTEM) <= MAX_CHARS:
                    out.append((split, task, i, ex[0], ex[1]))
                    taken += 1
    return out


def most_frequent(counter):
    """The most frequent key; the alphabetically first among equals."""
    return min(counter, key=lambda k: (-counter[k], k))


def record(user, answer, task=None):
    """One JSON line: the conversation, and for the test split its task and answer."""
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    line = {"messages": messages}
    if task is not None:
        line.update(task=task, answer=answer)
    return json.dumps(line, ensure_ascii=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path("datasets/shakespeare"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-play", type=int, default=40,
                        help="train examples per work and task (default 40)")
    parser.add_argument("--test-per-play", type=int, default=2,
                        help="test examples per work and task (default 2)")
    args = parser.parse_args()

    titles = read_titles(args.corpus)
    rows = []
    for path in sorted(args.corpus.glob("*.txt")):
        work = path.stem
        units, names = load_work(path)
        rng = random.Random(f"{args.seed}:{work}")
        test_blocks = set(rng.sample(range(BLOCKS), TEST_BLOCKS))
        split_of_unit = [
            "test" if i * BLOCKS // len(units) in test_blocks else "train"
            for i in range(len(units))
        ]
        per_split = {"train": args.per_play, "test": args.test_per_play}
        rows += [(work,) + r for r in make_examples(units, titles[work], names,
                                                     split_of_unit, per_split, rng)]

    # A passage repeated in the text (a refrain, a stock line) must not leak into test.
    train_prompts = {user for _, split, _, _, user, _ in rows if split == "train"}
    dropped = sum(1 for r in rows if r[1] == "test" and r[4] in train_prompts)
    rows = [r for r in rows if not (r[1] == "test" and r[4] in train_prompts)]

    random.Random(args.seed).shuffle(rows)  # mix works and tasks for training
    args.out.mkdir(parents=True, exist_ok=True)
    counts = collections.Counter((split, task) for _, split, task, _, _, _ in rows)
    answers = collections.defaultdict(collections.Counter)
    with open(args.out / "train.jsonl", "w", encoding="utf-8") as train, \
            open(args.out / "test.jsonl", "w", encoding="utf-8") as test:
        for _, split, task, _, user, answer in rows:
            if split == "train":
                train.write(record(user, answer) + "\n")
                answers[task][answer] += 1
            else:
                test.write(record(user, answer, task) + "\n")
    summary = {
        "seed": args.seed,
        "counts": {s: {t: counts[(s, t)] for t in TASKS} for s in ("train", "test")},
        "test_dropped_as_seen_in_train": dropped,
        "most_frequent_train_answer": {t: most_frequent(answers[t]) for t in TASKS},
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for split in ("train", "test"):
        per_task = ", ".join(f"{t} {counts[(split, t)]}" for t in TASKS)
        print(f"{split}: {sum(counts[(split, t)] for t in TASKS)} examples ({per_task})")
    print(f"wrote {args.out}/train.jsonl, test.jsonl, summary.json")


if __name__ == "__main__":
    main()
