"""The ingest flow: declared sources -> warehouse, with a table of counts and a reject-rate gate.

    for each source:  ingest-source   (files -> triplets | rejects, each file once)
    then:             publish-ingest-report   (Prefect table artifact "ingest-report")
    then:             the gate: more rejected than max_reject_rate -> the flow fails

The counts are published before the gate, so a failed run still shows what was read and why
rows were rejected; accepted rows and rejects are committed either way (nothing is lost).

Two ways in, both used by the `cut-align ingest` command (flows/cli.py):

    ingest_flow(sources=[Source(...).model_dump(mode="json")], warehouse="work/warehouse.duckdb",
                max_reject_rate=0.10)
    run_ingest(["data/*.jsonl"], "work/warehouse.duckdb", {"instruction": "question"}, 0.10)

Run it directly:  python -m flows.ingest WAREHOUSE PATH [PATH ...]
"""

from __future__ import annotations

import json
import sys

from prefect import flow, get_run_logger

from cut_core.data import warehouse as wh
from cut_core.dsl import DEFAULT_MAX_RECORD_BYTES, Polarity, Source
from cut_core.data.ingest.report import IngestReport, check_reject_rate, default_batch
from cut_core.data.ingest.run import ingest_sources
from cut_core.data.ingest.sources import check_sources
from tasks.ingest import ingest_source, publish_ingest_report


@flow(name="ingest", log_prints=False)
def ingest_flow(sources: list[dict], warehouse: str, max_reject_rate: float = 0.10, batch: str | None = None,
                max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> dict:
    """Ingest the files of every source into `warehouse` under one batch name and one gate.

    sources: DSL `Source` declarations as dicts (`Source.model_dump(mode="json")`): paths or
        globs, format, column mapping, polarity rule, labeled.
    warehouse: the DuckDB file (created with its schema when missing).
    max_reject_rate: fraction 0..1; above it the flow raises `cut_core.data.ingest.RejectRateExceeded`
        (its `.report` is the dict below) after publishing the counts.
    batch: the name written on every row of this run (default: "ingest-<UTC timestamp>").
    max_record_bytes: records longer than this are rejected as oversized.
    Returns the report dict: batch, rows_read, accepted, rejected, rejected_by_reason,
    positives, negatives, unlabeled, contradictions, blank_lines, skipped_files, files.
    """
    logger = get_run_logger()
    batch = batch or default_batch()

    # ---- ingest: one task per source; gate once over all of them, below
    reports = [ingest_source(source, warehouse, None, batch, max_record_bytes) for source in sources]
    report = IngestReport.combine([IngestReport.from_dict(r) for r in reports], batch)
    result = report.to_dict()

    # ---- publish the counts (before the gate, so a failing run still shows them)
    publish_ingest_report(result)
    logger.info(f"batch {batch}: {report.rows_read} rows read, {report.accepted} accepted "
                f"({report.positives} positive, {report.negatives} negative, {report.unlabeled} unlabeled, "
                f"{report.contradictions} contradictions), {report.rejected} rejected "
                f"{report.rejected_by_reason}; skipped {len(report.skipped_files)} file(s) already ingested")

    # ---- the gate
    check_reject_rate(report, max_reject_rate)
    return result


def run_ingest(paths: list[str], warehouse: str, column_map: dict[str, str] | None = None,
               max_reject_rate: float = 0.10, use_prefect: bool = True, max_record_bytes: int | None = None,
               delimiter: str | None = None, format: str = "auto", score_threshold: float | None = None) -> dict:
    """Ingest files or globs with one column mapping: what `cut-align ingest` calls.

    column_map: canonical name -> the file's column, e.g. {"instruction": "question",
        "response": "answer", "judgment": "feedback"}; `output` is read as the response anyway.
        A column may be a path into nested JSON ("meta.text", "turns[0].text", or
        "completions[*].response": one triplet per element of `completions`).
    format: Source.format ('hf' reads `datasets` folders). score_threshold: rows whose `score`
        column (map it with column_map) is at least this are positive (Polarity.score_column).
    use_prefect: True runs `ingest_flow` (a Prefect flow run with its artifact); False runs the
        same library code directly, with no Prefect server (for scripts and notebooks).
    Returns the report dict of `ingest_flow`. Raises `cut_core.data.ingest.RejectRateExceeded`
    (`.report` holds the same dict) above `max_reject_rate`, `cut_core.data.ingest.IngestError`
    when a path matches no file or a file cannot be read, and `WarehouseBusy` when another
    process keeps the warehouse open for writing.
    """
    polarity = Polarity(score_column="score", score_threshold=score_threshold) if score_threshold is not None \
        else Polarity()
    source = Source(paths=list(paths), columns=dict(column_map or {}), delimiter=delimiter, format=format,
                    polarity=polarity)
    max_record_bytes = max_record_bytes or DEFAULT_MAX_RECORD_BYTES
    check_sources([source])      # a missing file fails here, before any flow run or server starts
    if use_prefect:
        return ingest_flow([source.model_dump(mode="json")], warehouse, max_reject_rate,
                           max_record_bytes=max_record_bytes)
    con = wh.connect(warehouse)
    try:
        report = ingest_sources(con, [source], max_record_bytes=max_record_bytes)
    finally:
        con.close()
    check_reject_rate(report, max_reject_rate)
    return report.to_dict()


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python -m flows.ingest WAREHOUSE PATH [PATH ...]")
    print(json.dumps(run_ingest(sys.argv[2:], sys.argv[1])))
