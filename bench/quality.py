"""Quality benchmark: the demo task with equal budget for CUT and the baselines.

Every objective starts from the same base model and runs the same online loop as the demo
(same number of iterations, new instructions per iteration, same optimizer settings and
steps per example); only the objective differs. Accuracy is the verifier's held-out accuracy
after the last iteration. Each objective runs as its own pipeline (its own MLflow experiment),
so the runs can be compared in the MLflow UI afterwards.

    .venv/bin/python bench/quality.py [--iterations K] [--objectives cut,sft,hindsight,forward_prediction,...]

ilf_mle and ilf_dpo get their refinements from the model being aligned (objective.refiner =
"model"), as the paper's online ILF does; dpo has no place in this online loop (one response per
instruction, so no scored pairs) and is refused by the DSL.

Last line: {"accuracy": {objective: accuracy}, "base": accuracy, "per_iteration": {...}, ...}
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flows  # noqa: E402,F401  (quiet, offline library defaults)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", default="cut,sft,hindsight,forward_prediction,ilf_mle,ilf_dpo")
    parser.add_argument("--iterations", type=int, default=None, help="default: the demo's")
    parser.add_argument("--workdir", default=str(ROOT / "work" / "bench-quality"))
    args = parser.parse_args()

    from flows.align import online_align
    from flows.demo import demo_pipeline, standard_error

    demo = demo_pipeline()
    base_model = demo.model.path  # shared: built once by the first run, reused by the others
    results, per_iteration, seconds = {}, {}, {}
    base = None
    for name in args.objectives.split(","):
        # ILF: a refinement as long as an answer the demo generates (its answers are a few tokens)
        objective = demo.objective.model_copy(update={"name": name,
                                                      "refine_max_new_tokens": demo.online.max_new_tokens})
        online = demo.online if args.iterations is None else demo.online.model_copy(update={"iterations": args.iterations})
        pipeline = demo.model_copy(update={
            "name": f"quality-{name.replace('_', '-')}", "workdir": str(Path(args.workdir) / name),
            "objective": objective, "online": online,
            "model": demo.model.model_copy(update={"path": base_model})})
        started = time.perf_counter()
        result = online_align(pipeline.to_json(), pipeline.name)
        seconds[name] = round(time.perf_counter() - started, 1)
        base = result["base"]["positive_rate"]
        per_iteration[name] = [it["metrics"]["positive_rate"] for it in result["iterations"]]
        results[name] = per_iteration[name][-1]
        print(f"{name:<20} base {100 * base:.1f}%  iterations " +
              " ".join(f"{100 * a:.1f}%" for a in per_iteration[name]) + f"  ({seconds[name]} s)", flush=True)

    n = demo.evaluation.max_prompts
    print(f"\nheld-out problems: {n}; standard error of one accuracy near 50%: "
          f"{100 * standard_error(0.5, n):.1f} points")
    print(json.dumps({"accuracy": results, "base": base, "per_iteration": per_iteration,
                      "n_heldout": n, "standard_error_at_50pct": round(standard_error(0.5, n), 4),
                      "seconds": seconds}))


if __name__ == "__main__":
    main()
