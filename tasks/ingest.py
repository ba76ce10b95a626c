"""The ingest tasks: source files -> validated triplets and quarantined rejects in the warehouse.

    ingest_source          one DSL Source (JSON) -> its files ingested; returns the report dict
    publish_ingest_report  the counts as a Prefect table artifact (one row per file + a total)

Thin on purpose: reading, validation, deduplication and the reject-rate gate live in
`cut_core.data.ingest`. What the orchestrator adds: the warehouse connection is opened and closed
inside the task (DuckDB allows one writer process, so nothing holds it between stages), a
retry when another process holds the warehouse, and the artifact. Inputs and outputs are
JSON (source declarations, paths, report dicts), never connections or frames.
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from cut_core.data import warehouse as wh
from cut_core.dsl import DEFAULT_MAX_RECORD_BYTES, Source
from cut_core.data.ingest.report import REASONS, IngestReport, check_reject_rate
from cut_core.data.ingest.run import ingest_sources
from tasks.logs import task_logger


def _retry_when_busy(task, task_run, state) -> bool:
    """Retry only when another process held the warehouse; a bad file fails at once."""
    try:
        state.result()
    except wh.WarehouseBusy:
        return True
    except Exception:
        return False
    return False


# Retries matter here: a second writer (a CLI ingest, another flow) makes warehouse.connect wait
# 30 s and then raise WarehouseBusy; files already committed are skipped on the retry, so
# retrying never ingests a row twice.
@task(name="ingest-source", task_run_name="ingest-{batch}", retries=2, retry_delay_seconds=10,
      retry_condition_fn=_retry_when_busy)
def ingest_source(source: str | dict, warehouse: str, max_reject_rate: float | None = None,
                  batch: str | None = None, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> dict:
    """Ingest every file of one source into the warehouse at `warehouse` (created if missing).

    source: a DSL `Source` as JSON text or dict (`Source.model_dump_json()`).
    max_reject_rate: raise `RejectRateExceeded` (after committing) above this rejected
        fraction; None leaves the gate to the caller (ingest_flow gates all sources together).
    batch: the batch name written on every row (default: a timestamp).
    max_record_bytes: records longer than this are rejected as oversized (Ingestion.max_record_bytes).
    Returns `IngestReport.to_dict()`: rows_read, accepted, rejected, rejected_by_reason,
    positives, negatives, unlabeled, contradictions, blank_lines, skipped_files, files.
    """
    src = Source.model_validate_json(source) if isinstance(source, str) else Source.model_validate(source)
    con = wh.connect(warehouse)
    try:
        report = ingest_sources(con, [src], batch=batch, max_record_bytes=max_record_bytes)
    finally:
        con.close()
    log = task_logger(__name__)
    for f in report.files:
        if f.skipped:
            log.info(f"{f.path}: already ingested (batch {f.earlier['batch']}); skipped")
        else:
            log.info(f"{f.path}: {f.rows_read} rows, {f.accepted} accepted ({f.positives} positive, "
                     f"{f.negatives} negative, {f.unlabeled} unlabeled), {f.rejected} rejected "
                     f"{f.rejected_by_reason}")
    if max_reject_rate is not None:
        check_reject_rate(report, max_reject_rate)
    return report.to_dict()


def report_table(report: dict) -> list[dict]:
    """Rows of the artifact: one per file, then the total; one column per reject reason seen."""
    reasons = [r for r in REASONS if r in report["rejected_by_reason"]]
    counts = ("rows_read", "accepted", "rejected", "positives", "negatives", "unlabeled", "contradictions")
    rows = []
    for f in report["files"]:
        rows.append({"file": f["path"], "status": "skipped (already ingested)" if f["skipped"] else "ingested",
                     **{k: f[k] for k in counts}, **{r: f["rejected_by_reason"].get(r, 0) for r in reasons}})
    rows.append({"file": "TOTAL", "status": f"batch {report['batch']}", **{k: report[k] for k in counts},
                 **{r: report["rejected_by_reason"][r] for r in reasons}})
    return rows


@task(name="publish-ingest-report")
def publish_ingest_report(report: dict, key: str = "ingest-report") -> str:
    """Publish the counts as a Prefect table artifact under `key`; returns the artifact id."""
    total = IngestReport.from_dict(report)
    rows, rejected = total.gate_counts()
    description = (f"Ingest batch `{report['batch']}`: {report['rows_read']} rows read, {report['accepted']} "
                   f"accepted, {report['rejected']} rejected ({rejected / rows:.1%} with skipped files' "
                   f"earlier counts). Rejected rows are in the warehouse table `rejects` with their reason."
                   if rows else f"Ingest batch `{report['batch']}`: no rows read.")
    artifact_id = create_table_artifact(key=key, table=report_table(report), description=description)
    return str(artifact_id)
