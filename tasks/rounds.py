"""The round tasks of recurring offline alignment (flows/align.py offline_align(recurring=True)).

    select_round_triplets  fix a round's triplets: labeled, from the declared files, none that a
                           finished round of the same pipeline trained on
    mark_round_trained     record the registered version the round trained on them

Thin on purpose: the SQL lives in `cut_core.data.warehouse` (select_round, round_trained). The flow
stores the selection's counts as a stage, so a resumed round trains on the same triplets even if
files arrived meanwhile (the ids themselves are kept in the warehouse table round_triplets).
"""

from __future__ import annotations

from prefect import task

from cut_core.data import warehouse as wh
from tasks.logs import task_logger


@task(name="select-round-triplets", task_run_name="select-{round_key}")
def select_round_triplets(pipeline_name: str, round_key: str, warehouse: str, digests: list[str]) -> dict:
    """The round's triplets, fixed in the warehouse; returns their counts and the round key."""
    con = wh.connect(warehouse)
    try:
        counts = wh.select_round(con, pipeline=pipeline_name, round=round_key, digests=digests)
    finally:
        con.close()
    task_logger(__name__).info(
        "round %s: %d triplets no earlier round of %s trained on (%d positive, %d negative), from %d file(s)",
        round_key, counts["triplets"], pipeline_name, counts["positives"], counts["negatives"], len(digests))
    return {**counts, "round": round_key, "files": len(digests)}


@task(name="mark-round-trained", task_run_name="trained-{round_key}")
def mark_round_trained(round_key: str, warehouse: str, version: int) -> int:
    """Record that the round's triplets went into registered `version`; returns how many."""
    con = wh.connect(warehouse)
    try:
        return wh.round_trained(con, round=round_key, version=version)
    finally:
        con.close()
