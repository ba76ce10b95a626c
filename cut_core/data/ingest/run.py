"""The per-file loop: one transaction per file, skipped when its digest is already recorded;
each chunk a reader yields is checked by one DuckDB statement (sql.validation_sql) into Arrow, its
conversation rows rewritten and checked again, and written by warehouse.add_checked (triplets,
or quarantined rejects); the counts go to the report and the reject-rate gate. Nothing per chunk
is a DuckDB temporary table: one dropped inside the file's transaction stays in memory until
the commit, so every chunk of a large file would be held to the end. Chunks are read and checked
on a thread one ahead of the writing thread (at most two alive), the file hashed meanwhile."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cut_core import dsl
from cut_core.data import warehouse as wh
from cut_core.data.ingest.chunks import prefetched, wide_encoding
from cut_core.data.ingest.conversations import rewrite_conversations
from cut_core.data.ingest.jsonl import read_jsonl, read_wide_lines
from cut_core.data.ingest.report import FileReport, IngestReport, check_reject_rate, default_batch
from cut_core.data.ingest.sources import DEFAULT_MAX_RECORD_BYTES, check_sources, detect_format, file_digest
from cut_core.data.ingest.sql import CONVERSATION, validation_sql
from cut_core.data.ingest.tables import read_arrow, read_csv, read_json_array, read_parquet

# Rows per Arrow record batch handed to DuckDB (zero-copy slices of a chunk): the unit its
# threads share a scan by.
SCAN_BATCH_ROWS = 8192
# DuckDB's memory limit while a file is ingested (restored afterwards): the rows of a large file
# wait, uncommitted, in DuckDB's buffers until the commit; under this limit they go to disk
# instead. Lower limits evict sooner and more often (the bench's 1M rows: 300MB, 9.2 s and
# ~1M page faults; 600MB, 8.2-8.8 s, peak RSS ~850 MB; without a limit ~1.4 GB).
INGEST_MEMORY_LIMIT = "600MB"


def _count(report: FileReport, reason: str | None, polarity: str | None, contradiction: bool | None, n: int) -> None:
    if reason == "blank":
        report.blank_lines += n
        return
    report.rows_read += n
    if reason is not None:
        report.rejected += n
        report.rejected_by_reason[reason] = report.rejected_by_reason.get(reason, 0) + n
        return
    report.accepted += n
    if polarity == "positive":
        report.positives += n
    elif polarity == "negative":
        report.negatives += n
    else:
        report.unlabeled += n
    if contradiction:
        report.contradictions += n


def _explain_json_errors(checked: pa.Table) -> pa.Table:
    """Python's parser names the position of a syntax error; only the (rare) malformed rows pay."""
    reason, detail = checked.column("reason").combine_chunks(), checked.column("detail").combine_chunks()
    bad = pc.and_(pc.equal(reason, "malformed_json"), pc.is_null(detail)).fill_null(False)
    at = np.flatnonzero(bad.to_numpy(zero_copy_only=False))
    if not len(at):
        return checked
    raw = checked.column("raw").take(pa.array(at))
    details = []
    for text in raw.to_pylist():
        try:
            json.loads(text)
            details.append("not valid JSON")
        except (ValueError, RecursionError, TypeError) as err:
            details.append(f"not valid JSON: {err}"[:300])
    explained = pc.replace_with_mask(detail, bad, pa.array(details, detail.type))
    return checked.set_column(checked.schema.get_field_index("detail"), "detail", explained)


def _check_chunk(con: duckdb.DuckDBPyConnection, lines: pa.Table, source: dsl.Source,
                 check_sqls: dict[bool, str]) -> tuple[pa.Table, pa.Table]:
    """(the chunk, its checked rows): one validation statement over the chunk; conversation
    rows are rewritten (Python, those rows only) and the chunk checked again. The checked rows
    are Arrow, not a temporary table (one dropped inside the file's transaction would stay in
    memory until the commit), in record batches DuckDB's threads share when the writes scan them."""
    with wh.arrow_view(con, "_ingest_chunk", lines):
        checked = con.sql(check_sqls[False]).to_arrow_table(batch_size=SCAN_BATCH_ROWS)
    is_conversation = pc.equal(checked.column("reason"), CONVERSATION).fill_null(False)
    if pc.any(is_conversation).as_py():
        conversations = pc.filter(checked.column("row_number"), is_conversation).to_pylist()
        del checked
        lines = rewrite_conversations(lines, source, conversations)
        with wh.arrow_view(con, "_ingest_chunk", lines):
            checked = con.sql(check_sqls[True]).to_arrow_table(batch_size=SCAN_BATCH_ROWS)
    return lines, _explain_json_errors(checked)


def _checked_chunks(chunks, con: duckdb.DuckDBPyConnection, source: dsl.Source, check_sqls: dict[bool, str],
                    seconds: dict[str, float]):
    """(lines, checked rows) of each chunk, checked on `con`; the time the checks took is added
    to seconds['check']."""
    for chunk in chunks:
        t = time.perf_counter()
        # many small record batches: DuckDB scans an Arrow stream batch by batch on every core
        # (one 64 MB batch would hold every statement over the chunk to one thread)
        lines = pa.Table.from_batches(chunk.to_batches(max_chunksize=SCAN_BATCH_ROWS))
        del chunk
        checked = _check_chunk(con, lines, source, check_sqls)
        del lines
        seconds["check"] += time.perf_counter() - t
        yield checked


def ingest_file(con: duckdb.DuckDBPyConnection, path: str | Path, source: dsl.Source, *, batch: str,
                max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> FileReport:
    """Ingest one file in one transaction; skip it when its digest is already recorded.

    The connection must be a writable warehouse connection (warehouse.connect) with no open
    transaction: this function commits the file's triplets, rejects and digest together, or
    nothing. `triplets.source` and `rejects.source` hold the file's absolute path, symlinks not
    resolved. Each chunk of records is checked by one DuckDB statement (sql.validation_sql) into an
    Arrow table and written by warehouse.add_checked, so memory stays bounded by two chunks (the
    one being written, the next being checked).
    """
    path = Path(os.path.abspath(path))
    fmt = detect_format(path, source.format)
    seconds = {"digest": 0.0, "check": 0.0, "write": 0.0}
    check_sqls = {False: validation_sql(source), True: validation_sql(source, context=True)}
    cur = con.cursor()    # the reader's scans stream on their own cursor
    con.execute("SET enable_progress_bar = false")   # DuckDB would draw one on a terminal
    cur.execute("SET enable_progress_bar = false")
    wide = wide_encoding(path)
    if fmt == "jsonl":
        chunks = (read_wide_lines(path, *wide, max_record_bytes) if wide
                  else read_jsonl(path, max_record_bytes))
    elif fmt == "json":
        chunks = read_json_array(cur, path, max_record_bytes)
    elif fmt == "parquet":
        chunks = read_parquet(cur, path, max_record_bytes)
    elif fmt == "arrow":
        chunks = read_arrow(cur, path, max_record_bytes)
    else:
        chunks = read_csv(cur, path, source, max_record_bytes)
    # Each chunk is read and checked on its own cursor, on a thread, one chunk ahead of this
    # thread, which writes the one before into the file's transaction: DuckDB compresses an
    # insert's rows on one thread, and the next chunk's check (JSON, ids) runs beside it. A
    # check reads only its chunk (an Arrow view on the checking cursor), never the warehouse.
    # The first chunk is checked while this thread hashes the file; only then is the file
    # looked up, before anything is written: a file already ingested costs that one check.
    check_cur = con.cursor()
    check_cur.execute("SET enable_progress_bar = false")
    checked_chunks = prefetched(_checked_chunks(chunks, check_cur, source, check_sqls, seconds), "ingest-checker")
    previous_limit = None
    try:
        started = time.perf_counter()
        digest = file_digest(path, source, fmt, max_record_bytes)
        seconds["digest"] = time.perf_counter() - started
        report = FileReport(path=str(path), format=fmt, digest=digest)
        earlier = wh.ingested_file(con, digest)
        if earlier:
            report.skipped, report.earlier = True, earlier
            return report
        previous_limit = con.sql("SELECT current_setting('memory_limit')").fetchall()[0][0]
        con.execute(f"SET memory_limit = '{INGEST_MEMORY_LIMIT}'")
        with wh.transaction(con):
            for lines, checked in checked_chunks:
                t = time.perf_counter()
                # the chunk stays visible for the raw text of duplicates (good rows keep none);
                # both go when the block ends, not at the commit
                with wh.arrow_view(con, "_ingest_chunk", lines), wh.arrow_view(con, "_ingest_checked", checked):
                    del lines, checked
                    for reason, polarity, contradiction, n in wh.add_checked(
                            con, "_ingest_checked", source=str(path), batch=batch, digest=digest,
                            lines="_ingest_chunk"):
                        _count(report, reason, polarity, contradiction, n)
                seconds["write"] += time.perf_counter() - t
            t = time.perf_counter()
            wh.record_ingested_file(con, digest=digest, path=str(path), rows_read=report.rows_read,
                                    accepted=report.accepted, rejected=report.rejected, batch=batch)
        seconds["write"] += time.perf_counter() - t     # the commit included
    finally:
        checked_chunks.close()    # stops the checking thread before the reader it reads from
        chunks.close()
        check_cur.close()
        cur.close()
        if previous_limit is not None:
            con.execute(f"SET memory_limit = '{previous_limit}'")
    report.seconds = {k: round(v, 3) for k, v in seconds.items()}
    report.rejected_by_reason = dict(sorted(report.rejected_by_reason.items()))
    return report


def ingest_files(con: duckdb.DuckDBPyConnection, source: dsl.Source, *, max_reject_rate: float | None = None,
                 batch: str | None = None, base: str | Path | None = None,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> IngestReport:
    """Ingest every file of one DSL `Source` (paths and globs); see `ingest_sources`."""
    return ingest_sources(con, [source], max_reject_rate=max_reject_rate, batch=batch, base=base,
                          max_record_bytes=max_record_bytes)


def ingest_sources(con: duckdb.DuckDBPyConnection, sources: Sequence[dsl.Source], *,
                   max_reject_rate: float | None = None, batch: str | None = None,
                   base: str | Path | None = None, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> IngestReport:
    """Ingest the files of several sources under one batch name and one reject-rate gate.

    Each file is committed on its own (its triplets, rejects and digest); a file already
    ingested with the same bytes and settings is skipped and listed in `skipped_files`.
    After all files, a rejected fraction above `max_reject_rate` raises RejectRateExceeded
    carrying the report (None: no gate). Returns the IngestReport.
    """
    batch = batch or default_batch()
    report = IngestReport(batch=batch)
    for src, path in check_sources(sources, base=base):
        report.files.append(ingest_file(con, path, src, batch=batch, max_record_bytes=max_record_bytes))
    if max_reject_rate is not None:
        check_reject_rate(report, max_reject_rate)
    return report
