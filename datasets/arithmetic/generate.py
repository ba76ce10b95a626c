"""Write the arithmetic demo's prompt files (deterministic: same seed, same bytes).

    python datasets/arithmetic/generate.py            # rewrites the files next to this script
    python datasets/arithmetic/generate.py --out DIR  # writes them elsewhere

Files (JSON Lines, one problem per line, in split order):
    heldout.jsonl    500 problems: {"instruction", "reference"}   held-out evaluation
    online.jsonl    2000 problems: {"instruction", "reference"}   online prompts, 500 per iteration
    warmstart.jsonl 5600 problems: {"instruction", "reference"}   the only problems the base model
                                                                   is warm-started on
The three splits partition all 8100 ordered pairs of 2-digit numbers (cut_core.tasks.arithmetic).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere in the repo

from cut_core.tasks import arithmetic as demo_task  # noqa: E402

FILES = {"heldout": "heldout.jsonl", "online": "online.jsonl", "warmstart": "warmstart.jsonl"}


def write(out_dir: str | Path, seed: int = demo_task.SPLIT_SEED) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, problems in demo_task.split_problems(seed).items():
        path = out / FILES[split]
        lines = [json.dumps({"instruction": demo_task.instruction(a, b), "reference": str(a + b)})
                 for a, b in problems]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths[split] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="output folder")
    ap.add_argument("--seed", type=int, default=demo_task.SPLIT_SEED, help="split seed")
    args = ap.parse_args(argv)
    for split, path in write(args.out, args.seed).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
