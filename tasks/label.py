"""The label tasks: the pipeline's judge turns responses into judgments.

    label_unlabeled   offline: triplets ingested without a judgment (polarity NULL) get one
    judge_pairs       online: this iteration's generations are judged and become triplets

Thin on purpose: the work (caching by judge + content, retries per HTTP call, failures kept
apart from negatives) lives in `cut_core.judge`. These tasks add what only the orchestrator
knows: Prefect Secret blocks for API keys, task-level retries, and a loud failure when most
calls failed (a wrong key or a dead endpoint should stop the flow, not train on nothing).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from prefect import task

from cut_core.dsl import Pipeline
from cut_core.judge import Judge, build_judge, label_pending
from cut_core.data.polarity import judge_rules
from cut_core.data import warehouse as wh
from cut_core.data.warehouse import connect
from cut_core.data.warehouse import triplet_sources as warehouse_sources
from tasks.logs import task_logger


def resolve_secret(name: str) -> str:
    """The value of a Prefect Secret block (created in the UI or with `Secret(value=...).save(name)`)."""
    from prefect.blocks.system import Secret

    return Secret.load(name).get()


# How often a batch being judged reports progress to the task's log ("judge: 120/500 done ...").
PROGRESS_EVERY_S = 30.0


class TooManyFailedJudgments(RuntimeError):
    """Most judge calls failed: the results are stored, the flow should stop and say why."""


def pipeline_judge(pipeline: Pipeline) -> Judge:
    """The declared judge, its API key resolved from a Prefect Secret when one is named.

    Polarity prefixes come from the sources declared `labeled=False` (the rows this judge is
    for); without such a source the paper's rule applies: "Perfect..." is positive.
    """
    if pipeline.judge is None:
        raise ValueError(f"pipeline {pipeline.name} declares no judge")
    prefixes, markers = judge_rules(pipeline.sources)
    return build_judge(pipeline.judge, secret_resolver=resolve_secret, positive_prefixes=prefixes,
                       failed_markers=markers)


def _tokens(counts: dict) -> str:
    """The token usage of a batch for the log: unknown where no reply reported it."""
    def n(key: str) -> str:
        return "unknown" if counts.get(key) is None else str(counts[key])
    text = f"{n('prompt_tokens')} prompt + {n('completion_tokens')} completion tokens"
    if counts.get("usage_unknown"):
        text += f" ({counts['usage_unknown']} replies reported no usage: not in the sums)"
    return text


def _check(counts: dict, judge: Judge, max_failed_rate: float) -> None:
    task_logger(__name__).info(
        "judge %s: %d requested, %d cached, %d judged (%d ok: %d positive, %d negative; %d failed); %s",
        judge.name, counts["requested"], counts["cached"], counts["judged"], counts["ok"],
        counts["positives"], counts["negatives"], counts["failed"], _tokens(counts))
    if counts["judged"] and counts["failed"] / counts["judged"] > max_failed_rate:
        raise TooManyFailedJudgments(
            f"{counts['failed']} of {counts['judged']} judge calls failed (> {max_failed_rate:.0%}). "
            f"Failures are stored and retried on the next run; their errors are in the warehouse table "
            f"judgments (status 'failed', judge '{judge.name}')")


# Retries are cheap here: judgments already stored are cached, so a retry only re-sends what is
# still missing (earlier failures included). They cover a briefly busy warehouse or endpoint.
@task(name="label-unlabeled", retries=2, retry_delay_seconds=30)
def label_unlabeled(pipeline: Pipeline, warehouse: str, files: list[str] | None = None, *,
                    digests: list[str] | None = None, max_failed_rate: float = 0.5) -> dict:
    """Judge the unlabeled triplets (of the source paths `files`, or of the files with these
    ingest `digests`, when given; else all) with `pipeline`'s judge and label them.

    Returns the counts of `label_pending` plus `labeled` (triplets that received a judgment).
    A failed judgment is stored as such and leaves its triplet unlabeled: it is not trained on,
    and the next run retries it.
    """
    judge = pipeline_judge(pipeline)
    con = connect(warehouse)
    try:
        if digests is not None:
            files = (files or []) + warehouse_sources(con, digests)
        pending = wh.unlabeled_triplets(con, sources=files)
        counts = label_pending(con, judge, pending, progress=task_logger(__name__).info,
                               progress_every_s=PROGRESS_EVERY_S)
        counts["labeled"] = wh.apply_judgments(con, judge.name)
    finally:
        con.close()
    _check(counts, judge, max_failed_rate)
    return counts


@task(name="judge-generations", retries=2, retry_delay_seconds=30)
def judge_pairs(pipeline: Pipeline, warehouse: str, generations: str, batch: str, out_dir: str, *,
                max_failed_rate: float = 0.5) -> dict:
    """Judge generated (instruction, response) pairs with `pipeline`'s judge and add them to
    `triplets` under `batch`.

    generations: Parquet with prompt_index, instruction, response (tasks/generate.py).
    Every pair becomes a triplet (source = the Parquet path, row_number = prompt_index); a pair
    whose judgment failed is added unlabeled (polarity NULL), so materialize skips it. Writes
    `<out_dir>/judgments.parquet` (pair, judgment, polarity, status, error) for inspection.
    """
    judge = pipeline_judge(pipeline)
    frame = pl.read_parquet(generations).select("prompt_index", "instruction", "response")
    con = connect(warehouse)
    try:
        counts = label_pending(con, judge, frame.select("instruction", "response").rows(),
                               progress=task_logger(__name__).info, progress_every_s=PROGRESS_EVERY_S)
        judged = wh.judgments_of(con, judge.name, frame.to_arrow())
        ok = (judged["status"] == "ok").fill_null(False)
        rows = judged.with_columns(
            judgment=pl.when(ok).then(pl.col("judgment")),
            polarity=pl.when(ok).then(pl.col("polarity")),
        )
        # The one insert path for triplets (the same ids and duplicate rule as file ingest).
        added = wh.add_judged(con, rows.select("prompt_index", "instruction", "response", "judgment",
                                                     "polarity").to_arrow(), source=generations, batch=batch)
    finally:
        con.close()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    judged.write_parquet(out / "judgments.parquet")
    counts.update(triplets_added=added,
                  labeled=int(ok.sum()), unlabeled=int((~ok).sum()),
                  path=str(out / "judgments.parquet"))
    _check(counts, judge, max_failed_rate)
    return counts
