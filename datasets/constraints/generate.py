"""Write the constraints task's prompt files (deterministic: same seeds, same bytes).

    python datasets/constraints/generate.py            # rewrites the files next to this script
    python datasets/constraints/generate.py --out DIR  # writes them elsewhere

Files (JSON Lines, one object per line: {"instruction": str}):
    online.jsonl   600 instructions (seed 1)   online prompts, never reused across iterations
    heldout.jsonl  200 instructions (seed 2)   held-out evaluation; none also occurs in online.jsonl
See cut_core/tasks/constraints.py for the constraints and their verifier.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere in the repo

from cut_core.tasks import constraints as constraints_task  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    for name, path in constraints_task.write_datasets(parser.parse_args().out).items():
        print(f"{name}: {path}")
