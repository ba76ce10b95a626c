"""The label task: the pipeline's judge labels every triplet that still awaits one.

Thin on purpose: the work (caching by judge + content, retries per HTTP call, failures kept
apart from negatives) lives in `cut_core.judges`. This task adds what only the orchestrator
knows: Prefect Secret blocks for API keys, task-level retries, and a loud failure when most
calls failed (a wrong key or a dead endpoint should stop the flow, not train on nothing).
"""

from __future__ import annotations

import logging

from prefect import task
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from cut_core import dsl
from cut_core.judges import apply_judgments, build_judge, label_pending, unlabeled_triplets
from cut_core.warehouse import connect


def resolve_secret(name: str) -> str:
    """The value of a Prefect Secret block (created in the UI or with `Secret(value=...).save(name)`)."""
    from prefect.blocks.system import Secret

    return Secret.load(name).get()


def _logger():
    # `label_task.fn(...)` (tests, notebooks) runs without a Prefect run context.
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


class TooManyFailedJudgments(RuntimeError):
    """Most judge calls failed: the results are stored, the flow should stop and say why."""


# Retries are cheap here: judgments already stored are cached, so a retry only re-sends what is
# still missing (earlier failures included). They cover a briefly busy warehouse or endpoint.
@task(name="label", retries=2, retry_delay_seconds=30)
def label_task(warehouse_path: str, judge: dsl.FunctionJudge | dsl.TransformersJudge | dsl.OpenAIJudge,
               *, positive_prefixes: list[str] | None = None, max_failed_rate: float = 0.5) -> dict:
    """Judge the unlabeled triplets (polarity NULL) and label them; returns the counts.

    Counts are those of `label_pending` plus `labeled` (triplets that received a judgment now).
    A failed judgment is stored as such and leaves its triplet unlabeled; the next run retries it.
    """
    logger = _logger()
    judge_impl = build_judge(judge, secret_resolver=resolve_secret,
                             positive_prefixes=positive_prefixes or ["Perfect"])
    con = connect(warehouse_path)
    try:
        counts = label_pending(con, judge_impl, unlabeled_triplets(con))
        counts["labeled"] = apply_judgments(con, judge_impl.name)
    finally:
        con.close()
    logger.info(
        "judge %s: %d pending, %d cached, %d judged (%d ok: %d positive, %d negative; %d failed), %d labeled",
        judge_impl.name, counts["requested"], counts["cached"], counts["judged"], counts["ok"],
        counts["positives"], counts["negatives"], counts["failed"], counts["labeled"])
    if counts["judged"] and counts["failed"] / counts["judged"] > max_failed_rate:
        raise TooManyFailedJudgments(
            f"{counts['failed']} of {counts['judged']} judge calls failed (> {max_failed_rate:.0%}); "
            f"see the 'error' column: SELECT error, count(*) FROM judgments WHERE status = 'failed' "
            f"AND judge = '{judge_impl.name}' GROUP BY 1")
    return counts
