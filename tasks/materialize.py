"""Prefect task: warehouse triplets -> examples Parquet (cut_core.contrast.materialize).

Thin on purpose: read the labeled triplets with a read-only DuckDB connection (so it never
waits on, or blocks, the warehouse's single writer), load the model's tokenizer, and let
`contrast.materialize` do the work. The examples file is addressed by its digest, so a rerun
with the same inputs finds it and does nothing; no Prefect result caching is needed for that.
Returns paths and digests only (never frames), as tasks in this project do.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from cut_core import contrast
from cut_core import warehouse as wh
from cut_core.dsl import Objective, import_callable

TRIPLETS_SQL = """
SELECT id, instruction, response, judgment, polarity, refined
FROM triplets
WHERE polarity IS NOT NULL {filters}
ORDER BY id
"""


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called as materialize_examples.fn(...) outside a run
        return logging.getLogger(__name__)


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
    refine_callable: str | None = None,
    sources: list[str] | None = None,
) -> dict:
    """Materialize the examples of `batch` (None: every batch) for the model at `model_path`.

    sources: optionally keep only triplets ingested from these files (offline pipelines train
        on their declared sources, whichever batch first ingested them).
    objective_json: the DSL `Objective` as JSON (`pipeline.objective.model_dump_json()`).
    refine_callable: optional 'module:function' used by ilf_mle to refine negatives that have
        no refined text (see contrast.materialize's refine_fn); its spec names it in the digest.
    Returns {"path": str, "digest": str, "stats": dict}; the file is
    `<workdir>/examples/<digest>.parquet`.
    """
    from transformers import AutoTokenizer  # heavy import, only when the task runs

    objective = Objective.model_validate_json(objective_json)
    con = wh.connect(warehouse, read_only=True)
    try:
        filters, params = "", []
        if batch is not None:
            filters, params = filters + " AND batch = ?", params + [batch]
        if sources is not None:
            filters, params = filters + " AND list_contains(?, source)", params + [sources]
        # A relation (not execute().fetch*) so the connection is not left busy (STACK.md).
        triplets = con.sql(TRIPLETS_SQL.format(filters=filters), params=params or None).pl()
    finally:
        con.close()
    if triplets.height == 0:
        raise ValueError(f"no labeled triplets in {warehouse}" + (f" for batch {batch!r}" if batch else "")
                         + (f" from {sources}" if sources else "")
                         + "; ingest (and label) data first")

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    refine_fn = import_callable(refine_callable) if refine_callable else None
    path = contrast.materialize(
        triplets, tokenizer, objective=objective, template=template, max_length=max_length,
        out_dir=Path(workdir) / "examples", seed=seed, refine_fn=refine_fn, refine_name=refine_callable)
    stats = contrast.read_stats(path)
    _logger().info("examples %s: %s rows %s, %s prompt / %s response truncations", path.name,
                   stats.get("rows"), stats.get("rows_by_kind"), stats.get("prompt_truncated"),
                   stats.get("response_truncated"))
    return {"path": str(path), "digest": path.stem, "stats": stats}
