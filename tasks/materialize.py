"""Prefect task: warehouse triplets -> examples Parquet (cut_core.data.contrast.materialize), or
preference pairs for dpo/ilf_dpo (cut_core.data.preference.materialize_pairs).

Thin on purpose: read the labeled triplets with a read-only DuckDB connection (so it never
waits on, or blocks, the warehouse's single writer), load the model's tokenizer, pick the
objective's refiner (ILF), and let `contrast` / `preference` do the work. The file is addressed
by its digest, so a rerun with the same inputs finds it and does nothing; no Prefect result
caching is needed for that.
Returns paths and digests only (never frames), as tasks in this project do.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from cut_core.data import contrast, preference
from cut_core.data import warehouse as wh
from cut_core.data.contrast import RefineFn
from cut_core.dsl import ILFDPO, ILFMLE, ObjectiveSection, import_callable, parse_objective
from tasks.logs import task_logger

def refiner_for(objective: ObjectiveSection, model_path: str, template: str) -> tuple[RefineFn | None, str | None]:
    """(refine_fn, its digest name) for objective.refiner; (None, None) where no refiner applies."""
    if not isinstance(objective, (ILFMLE, ILFDPO)) or objective.refiner is None:
        return None, None
    if objective.refiner == "model":
        from cut_core.infer.refine import ModelRefiner

        refiner = ModelRefiner(model_path, template=template, max_new_tokens=objective.refine_max_new_tokens)
        return refiner, refiner.name
    return import_callable(objective.refiner), objective.refiner


@task(name="materialize-examples", task_run_name="materialize-{template}-{max_length}")
def materialize_examples(
    warehouse: str,
    batch: str | None,
    model_path: str,
    objective_json: str,
    template: str = "alpaca",
    max_length: int = 2048,
    workdir: str = "work",
    seed: int = 42,
    sources: list[str] | None = None,
    digests: list[str] | None = None,
    round_key: str | None = None,
) -> dict:
    """Materialize the examples of `batch` (None: every batch) for the model at `model_path`.

    digests: optionally keep only triplets ingested from the files with these ingest digests
        (offline pipelines train on the files their ingest step reports, whichever batch or path
        first ingested them).
    sources: optionally keep only triplets ingested from these paths.
    round_key: optionally keep only the triplets selected for this recurring offline round
        (warehouse.select_round; the run key of the round).
    objective_json: the DSL objective section as JSON (`pipeline.objective.model_dump_json()`).
    ILF objectives refine the negatives that lack a refined text with objective.refiner: 'model'
    (the model at `model_path`) or a 'module:function'; the refiner's name enters the digest.
    Returns {"path": str, "digest": str, "stats": dict}; the file is
    `<workdir>/examples/<digest>.parquet`.
    """
    from transformers import AutoTokenizer  # heavy import, only when the task runs

    objective = parse_objective(objective_json)
    con = wh.connect(warehouse, read_only=True)
    try:
        triplets = wh.labeled_triplets(con, batch=batch, digests=digests, sources=sources, round=round_key)
    finally:
        con.close()
    if triplets.height == 0:
        raise ValueError(f"no labeled triplets in {warehouse}" + (f" for batch {batch!r}" if batch else "")
                         + (f" from {sources}" if sources else "")
                         + (f" from the files with digests {digests}" if digests else "")
                         + (f" selected for round {round_key}" if round_key else "")
                         + "; ingest (and label) data first")

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    refine_fn, refine_name = refiner_for(objective, model_path, template)
    out_dir = Path(workdir) / "examples"
    if objective.preference_pairs:
        path = preference.materialize_pairs(triplets, tokenizer, objective=objective, template=template,
                                            out_dir=out_dir, refine_fn=refine_fn, refine_name=refine_name)
    else:
        path = contrast.materialize(
            triplets, tokenizer, objective=objective, template=template, max_length=max_length,
            out_dir=out_dir, seed=seed, refine_fn=refine_fn, refine_name=refine_name)
    stats = contrast.read_stats(path)
    truncations = (f", {stats.get('prompt_truncated')} prompt / {stats.get('response_truncated')} response "
                   "truncations" if "prompt_truncated" in stats else "")
    task_logger(__name__).info("examples %s: %s rows %s%s", path.name, stats.get("rows"), stats.get("rows_by_kind"),
                               truncations)
    return {"path": str(path), "digest": path.stem, "stats": stats}
