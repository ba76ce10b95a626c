"""`cut-align demo`: run pipelines/demo.py and print held-out accuracy per iteration.

The demo is an ordinary pipeline run (Prefect flow runs, MLflow runs, registered versions);
this module only picks the declaration, runs it, and prints the table with its noise: the
binomial standard error of an accuracy measured on n held-out problems, and of the difference
between two models scored on the same problems (a conservative, unpaired bound).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from cut_core.dsl import load_pipeline

DEMO_PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "demo.py"


def standard_error(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def demo_pipeline(workdir: str | None = None):
    pipeline = load_pipeline(DEMO_PIPELINE)
    if workdir:
        root = Path(workdir).resolve()
        pipeline = pipeline.model_copy(update={
            "workdir": str(root), "model": pipeline.model.model_copy(update={"path": str(root / "base-model")})})
    return pipeline


def accuracy_table(result: dict) -> tuple[list[dict], dict]:
    base = result["base"]
    n = int(base["n"])
    rows = [{"model": "base", "accuracy": base["positive_rate"], "version": None}]
    rows += [{"model": f"iteration {it['iteration']}", "accuracy": it["metrics"]["positive_rate"],
              "version": it["version"], "champion": it["champion"]} for it in result["iterations"]]
    last = rows[-1]["accuracy"]
    gain = last - base["positive_rate"]
    noise = math.sqrt(standard_error(last, n) ** 2 + standard_error(base["positive_rate"], n) ** 2)
    return rows, {"n_heldout": n, "gain": gain, "gain_standard_error": noise, "gain_in_standard_errors": gain / noise}


def run_demo(workdir: str | None = None, as_json: bool = False) -> int:
    from flows.align import run_pipeline

    started = time.perf_counter()
    pipeline = demo_pipeline(workdir)
    result = run_pipeline(pipeline)
    seconds = time.perf_counter() - started
    rows, noise = accuracy_table(result)

    print(f"\nHeld-out accuracy on {noise['n_heldout']} problems never seen in training "
          f"(greedy decoding, verifier-checked):")
    print(f"  {'model':<14}{'accuracy':>10}   {'± s.e.':>7}   registered")
    for row in rows:
        se = standard_error(row["accuracy"], noise["n_heldout"])
        reg = "" if row["version"] is None else f"v{row['version']}" + (" (champion)" if row.get("champion") else "")
        print(f"  {row['model']:<14}{100 * row['accuracy']:>9.1f}%   {100 * se:>6.1f}   {reg}")
    print(f"  last iteration vs base: {100 * noise['gain']:+.1f} points, "
          f"{noise['gain_in_standard_errors']:.1f} standard errors of the difference "
          f"(s.e. {100 * noise['gain_standard_error']:.1f} points)")
    print(f"  {'(finished earlier: nothing was rerun) ' if result.get('skipped') else ''}{seconds:.0f} s; "
          f"MLflow experiment '{pipeline.name}', registered model '{pipeline.registered_model or pipeline.name}'")
    if as_json:
        print(json.dumps({"base_accuracy": rows[0]["accuracy"],
                          "iteration_accuracy": [r["accuracy"] for r in rows[1:]],
                          "seconds": round(seconds, 1), "skipped": bool(result.get("skipped")), **noise,
                          "run_key": result["run_key"]}))
    return 0
