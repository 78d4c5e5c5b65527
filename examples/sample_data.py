"""Writes examples/data/: the small two-task dataset that README's walkthrough trains on.

Two tasks whose answers can be checked exactly, with a fixed seed: two-digit addition
("Add: 12 + 30 =" -> "42") and sentiment from a word lexicon ("Sentiment: the film was
dull and tedious ->" -> "negative"). No prompt of the evaluation file is in the training
file. The prompts end where the answer starts (no trailing newline), so a prompt typed
on the command line is exactly a training prompt.

    python examples/sample_data.py            # rewrites examples/data/tasks.jsonl and tasks-eval.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from multitask_smollm2 import NEGATIVE, POSITIVE, SUBJECTS  # noqa: E402  (one lexicon for both examples)

TASKS = ("addition", "sentiment")
TRAIN_PER_TASK, EVAL_PER_TASK, SEED = 160, 16, 0
DATA = Path(__file__).parent / "data"


def example(task: str, rng: random.Random) -> dict:
    if task == "addition":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return {"task": task, "prompt": f"Add: {a} + {b} =", "response": str(a + b)}
    positive = rng.random() < 0.5
    adj = rng.sample(POSITIVE if positive else NEGATIVE, 2)
    return {"task": task, "prompt": f"Sentiment: {rng.choice(SUBJECTS)} was {adj[0]} and {adj[1]} ->",
            "response": "positive" if positive else "negative"}


def rows(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, eval): distinct prompts per task, eval disjoint from train, tasks interleaved."""
    rng = random.Random(seed)
    train, held, seen = [], [], set()
    for task in TASKS:
        made = []
        while len(made) < TRAIN_PER_TASK + EVAL_PER_TASK:
            ex = example(task, rng)
            if ex["prompt"] not in seen:
                seen.add(ex["prompt"])
                made.append(ex)
        held += made[:EVAL_PER_TASK]
        train += made[EVAL_PER_TASK:]
    rng.shuffle(train)
    return train, held


def main() -> None:
    DATA.mkdir(exist_ok=True)
    for name, part in zip(("tasks.jsonl", "tasks-eval.jsonl"), rows()):
        (DATA / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        print(f"wrote {DATA / name} ({len(part)} rows)")


if __name__ == "__main__":
    main()
