"""A verifiable instruction-following task for real chat models (in the spirit of IFEval).

Each instruction is a short request followed by one or two constraints a program can check:

    Describe a river. Answer in at most 12 words. Include the word "water".

The verifier `judge` (a FunctionJudge: `cut_core.tasks.constraints:judge`) reads the constraints back
from the instruction text, checks the response, and returns None when every constraint holds, else a
judgment naming each broken constraint and how it broke ("The response has 31 words; at most 12
were asked."). The evaluation's positive_rate is then the constraint-satisfaction rate.

Constraints are phrased so that a short answer (a few dozen tokens) can satisfy every one: the task
runs on a CPU with a 135M-parameter model.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

TOPICS = [
    "Describe a river.", "Explain why people sleep.", "Describe your favourite season.", "Explain what a computer does.",
    "Describe a busy city street.", "Explain how to make tea.", "Describe the moon.", "Explain why exercise matters.",
    "Describe a forest in autumn.", "Explain what money is for.", "Describe a cat.", "Explain how plants grow.",
    "Describe the sea at night.", "Explain why we learn history.", "Describe a good friend.", "Explain what rain is.",
    "Describe a mountain.", "Explain how a bicycle works.", "Describe a quiet library.", "Explain why the sky is blue.",
    "Describe breakfast.", "Explain what a map is for.", "Describe a thunderstorm.", "Explain how to save energy.",
    "Describe a garden.", "Explain why music is popular.", "Describe a train journey.", "Explain what a vaccine does.",
    "Describe the desert.", "Explain how to learn a language.", "Describe a birthday party.",
    "Explain why bees matter.", "Describe snow.", "Explain what a teacher does.", "Describe an old house.",
    "Explain how bread is made.", "Describe a market.", "Explain why sleep helps memory.", "Describe the sun.",
    "Explain what recycling is.", "Describe a football match.", "Explain how a phone call works.",
    "Describe a lake in summer.", "Explain why people travel.", "Describe a bakery.", "Explain what gravity does.",
    "Describe a hospital.", "Explain how to plan a trip.", "Describe a bridge.", "Explain why trees are useful.",
]
WORDS = ["water", "light", "green", "simple", "quiet", "people", "small", "warm", "time", "home", "day", "good"]
START_WORDS = ["Yes", "Today", "Imagine", "Often", "Here"]
END_WORDS = ["done", "indeed", "always", "today"]

# One pattern per constraint kind, matching the sentence `constraint_text` writes.
PATTERNS = {
    "max_words": re.compile(r"Answer in at most (\d+) words\."),
    "min_words": re.compile(r"Answer in at least (\d+) words\."),
    "include": re.compile(r'Include the word "([^"]+)"\.'),
    "forbid": re.compile(r'Do not use the word "([^"]+)"\.'),
    "lowercase": re.compile(r"Write only in lowercase letters\."),
    "no_commas": re.compile(r"Do not use any commas\."),
    "bullets": re.compile(r'Answer with exactly (\d+) bullet points, each on its own line starting with "- "\.'),
    "start": re.compile(r'Start your answer with the word "([^"]+)"\.'),
    "end": re.compile(r'End your answer with the word "([^"]+)"\.'),
}
KINDS = tuple(PATTERNS)
_WORD = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*")
_BULLET = re.compile(r"^\s*[-*•]\s+\S")


def constraint_text(kind: str, value: int | str | None = None) -> str:
    return {
        "max_words": f"Answer in at most {value} words.",
        "min_words": f"Answer in at least {value} words.",
        "include": f'Include the word "{value}".',
        "forbid": f'Do not use the word "{value}".',
        "lowercase": "Write only in lowercase letters.",
        "no_commas": "Do not use any commas.",
        "bullets": f'Answer with exactly {value} bullet points, each on its own line starting with "- ".',
        "start": f'Start your answer with the word "{value}".',
        "end": f'End your answer with the word "{value}".',
    }[kind]


def parse_constraints(instruction: str) -> list[tuple[str, str | None]]:
    """(kind, value) of every constraint the instruction states, in order of appearance."""
    found = []
    for kind, pattern in PATTERNS.items():
        for m in pattern.finditer(instruction):
            found.append((m.start(), kind, m.group(1) if m.groups() else None))
    return [(kind, value) for _, kind, value in sorted(found)]


def words(text: str) -> list[str]:
    return _WORD.findall(text or "")


def check(kind: str, value: str | None, response: str) -> str | None:
    """None when `response` meets the constraint, else how it fails (a clause, no final period)."""
    found = words(response)
    lower = [w.lower() for w in found]
    if kind == "max_words":
        return None if len(found) <= int(value) else f"the response has {len(found)} words; at most {value} were asked"
    if kind == "min_words":
        return None if len(found) >= int(value) else f"the response has {len(found)} words; at least {value} were asked"
    if kind == "include":
        return None if value.lower() in lower else f'the word "{value}" does not appear'
    if kind == "forbid":
        n = lower.count(value.lower())
        return None if n == 0 else f'the forbidden word "{value}" appears {n} time{"s" * (n != 1)}'
    if kind == "lowercase":
        upper = sorted({w for w in found if any(c.isupper() for c in w)})
        return None if not upper else (f"{len(upper)} word{'s' * (len(upper) != 1)} contain capital letters "
                                       f"(first: \"{upper[0]}\"); only lowercase was asked")
    if kind == "no_commas":
        n = response.count(",")
        return None if n == 0 else f"the response has {n} comma{'s' * (n != 1)}; none were allowed"
    if kind == "bullets":
        n = sum(1 for line in response.splitlines() if _BULLET.match(line))
        return None if n == int(value) else f"the response has {n} bullet points; exactly {value} were asked"
    if kind == "start":
        first = lower[0] if lower else None
        return None if first == value.lower() else (
            f'the answer starts with "{found[0]}", not "{value}"' if found else f'the answer is empty, it must start with "{value}"')
    if kind == "end":
        last = lower[-1] if lower else None
        return None if last == value.lower() else (
            f'the answer ends with "{found[-1]}", not "{value}"' if found else f'the answer is empty, it must end with "{value}"')
    raise ValueError(f"unknown constraint kind {kind!r}")


def failures(instruction: str, response: str) -> list[str]:
    """How each broken constraint of the instruction fails; empty when all hold."""
    constraints = parse_constraints(instruction)
    if not constraints:
        raise ValueError(f"not a constraints-task instruction (no constraint found): {instruction[:80]!r}")
    return [f for f in (check(kind, value, response) for kind, value in constraints) if f is not None]


def is_satisfied(instruction: str, response: str) -> bool:
    return not failures(instruction, response)


def judge(instruction: str, response: str) -> str | None:
    """The verifier: None when every constraint holds, else a judgment naming what failed and how.
    Used as FunctionJudge(callable='cut_core.tasks.constraints:judge')."""
    failed = failures(instruction, response)
    if not failed:
        return None
    n = len(parse_constraints(instruction))
    head = (f"The response breaks {len(failed)} of the {n} constraints" if n > 1 else "The response breaks the constraint")
    return f"{head}: " + "; ".join(failed) + "."


# ---------------------------------------------------------------- instruction sets

def _constraint(rng: random.Random, kind: str) -> str:
    value: int | str | None = {
        "max_words": rng.choice([8, 10, 12, 15, 20]),
        "min_words": rng.choice([15, 20, 25]),
        "include": rng.choice(WORDS),
        "forbid": rng.choice(["the", "is", "and", "a"]),
        "bullets": rng.choice([2, 3]),
        "start": rng.choice(START_WORDS),
        "end": rng.choice(END_WORDS),
    }.get(kind)
    return constraint_text(kind, value)


def make_instructions(n: int, seed: int) -> list[str]:
    """`n` distinct instructions, each a topic and one or two constraints of different kinds
    (never contradicting: min and max words never meet, bullets come alone)."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        kinds = rng.sample(KINDS, 2 if rng.random() < 0.5 else 1)
        if {"max_words", "min_words"} <= set(kinds) or ("bullets" in kinds and len(kinds) > 1):
            kinds = kinds[:1]
        out[" ".join([rng.choice(TOPICS)] + [_constraint(rng, k) for k in kinds])] = None
    return list(out)


SPLIT_SEEDS = {"online": 1, "heldout": 2}


def write_datasets(out_dir: str | Path, n_online: int = 600, n_heldout: int = 200) -> dict[str, Path]:
    """The bundled datasets/constraints files: online prompts and held-out prompts (column
    'instruction'), from disjoint seeds; held-out instructions that also occur online are dropped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    online = make_instructions(n_online, SPLIT_SEEDS["online"])
    seen = set(online)
    heldout = [x for x in make_instructions(n_heldout * 2, SPLIT_SEEDS["heldout"]) if x not in seen][:n_heldout]
    paths = {}
    for name, rows in (("online", online), ("heldout", heldout)):
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps({"instruction": x}) + "\n" for x in rows))
    return paths
