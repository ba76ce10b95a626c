"""Files DuckDB reads and renders to JSON -> chunks: JSON arrays (json_each), Parquet
(read_parquet, BINARY decoded as UTF-8), Arrow IPC files (`datasets` shards) and CSV (read_csv
in an explicit RFC 4180 dialect, with its reject table)."""

from __future__ import annotations

import csv
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cut_core import dsl
from cut_core.data.ingest.chunks import RAW_KEEP, decoded_text, make_chunk, wide_encoding
from cut_core.data.ingest.report import IngestError
from cut_core.data.ingest.sql import ident as _ident
from cut_core.data.ingest.sql import lit as _lit

# Parquet, CSV and JSON-array records are validated in batches of this many rows.
CHUNK_ROWS = 131_072


def read_json_array(cur: duckdb.DuckDBPyConnection, path: Path, max_record_bytes: int) -> Iterator[pa.Table]:
    """A JSON array: DuckDB's json_each splits it into elements (1-based row numbers)."""
    text, bad = decoded_text(path)
    reason = "invalid_utf8" if bad and wide_encoding(path) is None else "invalid_encoding"
    try:
        rel = cur.sql("SELECT key::BIGINT + 1 AS row_number, value::VARCHAR AS text FROM json_each($doc)",
                      params={"doc": text})
        table = rel.to_arrow_table()
    except duckdb.Error as err:
        # Not a parseable array: no record can be told from the next, so the file is one bad row.
        detail = f"the file is not a valid JSON array: {str(err).splitlines()[0][:300]}"
        yield make_chunk([1], pa.array([None], pa.large_string()), {0: ("malformed_json", detail, text[:RAW_KEEP])})
        return
    texts = table.column("text").combine_chunks().cast(pa.large_string())
    pre = {}
    lengths = pc.binary_length(texts).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(lengths > max_record_bytes):
        pre[int(i)] = ("oversized", f"the record is {int(lengths[i])} bytes, above the maximum record size of "
                       f"{max_record_bytes} bytes (Ingestion.max_record_bytes)", texts[int(i)].as_py()[:RAW_KEEP])
    if bad:
        for i, v in enumerate(texts.to_pylist()):
            if "\ufffd" in v and i not in pre:
                pre[i] = (reason, f"{bad}; this element holds the bad bytes (shown as U+FFFD)", v)
    rows = table.column("row_number").to_numpy()
    for start in range(0, max(len(rows), 1), CHUNK_ROWS):
        part = {i - start: v for i, v in pre.items() if start <= i < start + CHUNK_ROWS}
        if len(rows):
            yield make_chunk(rows[start:start + CHUNK_ROWS], texts.slice(start, CHUNK_ROWS), part)


def literal_scan_path(path: Path) -> str:
    """A path DuckDB's readers open as that one file: DuckDB expands * ? [ as a glob, so they are
    written as one-character classes ([*], [?], [[]) that match only themselves."""
    return re.sub(r"([*?\[])", r"[\1]", str(path))


def _records_sql(cur: duckdb.DuckDBPyConnection, scan: str, max_record_bytes: int) -> tuple[str, str]:
    """(text, pre) expressions rendering a row of `scan` as a JSON object; BINARY columns are
    decoded as UTF-8, and a value that is not UTF-8 rejects its row as wrong_type."""
    described = cur.sql(f"DESCRIBE SELECT * FROM {scan}").fetchall()
    fields, bad = [], []
    for name, kind, *_ in described:
        if name == "file_row_number":
            continue
        col = _ident(name)
        if kind == "BLOB":
            fields.append(f"{_lit(name)}: try(decode({col}))")
            bad.append(f"CASE WHEN {col} IS NOT NULL AND try(decode({col})) IS NULL THEN "
                       f"{_lit('column ' + name + ' is BINARY that is not UTF-8 text')} END")
        else:
            fields.append(f"{_lit(name)}: {col}")
    text = "to_json({" + ", ".join(fields) + "})::VARCHAR"
    pre = ("concat_ws('; ', " + ", ".join(bad) + ")") if bad else "NULL"
    return text, pre


def _from_records(cur: duckdb.DuckDBPyConnection, sql: str, max_record_bytes: int) -> Iterator[pa.Table]:
    """Rows of (row_number, text, bad) from DuckDB -> chunks, wrong_type for bad BINARY values and
    oversized for records longer than the maximum."""
    rel = cur.sql(f"""
        SELECT row_number,
               CASE WHEN bad <> '' THEN 'wrong_type'
                    WHEN strlen(text) > {int(max_record_bytes)} THEN 'oversized' END AS pre_reason,
               text, bad
        FROM ({sql})""")
    for batch in rel.to_arrow_reader(CHUNK_ROWS):
        table = pa.Table.from_batches([batch])
        reasons = table.column("pre_reason")
        if reasons.null_count == len(reasons):
            yield make_chunk(table.column("row_number").to_numpy(), table.column("text").combine_chunks()
                         .cast(pa.large_string()))
            continue
        pre = {}
        texts = table.column("text").to_pylist()
        bad = table.column("bad").to_pylist()
        for i, reason in enumerate(reasons.to_pylist()):
            if reason == "oversized":
                pre[i] = (reason, f"the record is {len(texts[i].encode())} bytes as JSON, above the maximum record "
                          f"size of {max_record_bytes} bytes (Ingestion.max_record_bytes)", texts[i][:RAW_KEEP])
            elif reason:
                pre[i] = (reason, bad[i], texts[i])
        yield make_chunk(table.column("row_number").to_numpy(), pa.array(texts, pa.large_string()), pre)


def read_parquet(cur: duckdb.DuckDBPyConnection, path: Path, max_record_bytes: int) -> Iterator[pa.Table]:
    scan = f"read_parquet({_lit(literal_scan_path(path))}, file_row_number = true)"
    try:
        text, bad = _records_sql(cur, scan, max_record_bytes)
        yield from _from_records(cur, f"SELECT file_row_number + 1 AS row_number, {text} AS text, {bad} AS bad "
                                      f"FROM {scan} ORDER BY file_row_number", max_record_bytes)
    except duckdb.Error as err:
        raise IngestError(f"cannot read Parquet file {path}: {str(err).splitlines()[0]}") from err


def read_arrow(cur: duckdb.DuckDBPyConnection, path: Path, max_record_bytes: int) -> Iterator[pa.Table]:
    """An Arrow IPC file (a `datasets` save_to_disk shard is the streaming format; the random-access
    file format is read too), memory-mapped, rendered to JSON by DuckDB like Parquet."""
    try:
        source = pa.memory_map(str(path))
        try:
            table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except (pa.ArrowInvalid, OSError) as err:
        raise IngestError(f"cannot read Arrow file {path}: {err}") from err
    if "file_row_number" in table.column_names:
        raise IngestError(f"cannot read Arrow file {path}: it has a column named file_row_number, which the reader "
                          "uses for row numbers")
    table = table.append_column("file_row_number", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    cur.register("_ingest_arrow", table)
    try:
        text, bad = _records_sql(cur, "_ingest_arrow", max_record_bytes)
        yield from _from_records(cur, f"SELECT file_row_number + 1 AS row_number, {text} AS text, {bad} AS bad "
                                      f"FROM _ingest_arrow ORDER BY file_row_number", max_record_bytes)
    except duckdb.Error as err:
        raise IngestError(f"cannot read Arrow file {path}: {str(err).splitlines()[0]}") from err
    finally:
        cur.unregister("_ingest_arrow")


def csv_delimiter(path: Path, source: dsl.Source) -> str:
    """The declared delimiter, else by extension: tab for .tsv/.tab, a comma otherwise."""
    if source.delimiter:
        return source.delimiter
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def read_csv(cur: duckdb.DuckDBPyConnection, path: Path, source: dsl.Source,
              max_record_bytes: int) -> Iterator[pa.Table]:
    """CSV with a header row, in an explicit dialect: RFC 4180 quoting ('"', doubled to escape),
    the delimiter by extension or declared; nothing is sniffed per file, so one odd record
    cannot switch how the others are read. Row numbers count data records (the header is not
    a row). DuckDB sets aside records it cannot split (and non-UTF-8 or oversized ones) in a
    rejects table that names their record number; the good records get the other numbers in order.
    """
    wide = wide_encoding(path)
    tmp = None
    if wide is not None:     # DuckDB reads UTF-8: transcode a BOM-marked UTF-16/32 file first
        text, bad = decoded_text(path)
        if bad:
            raise IngestError(f"cannot read CSV file {path}: {bad}")
        tmp = tempfile.NamedTemporaryFile("w", suffix=".csv", encoding="utf-8", delete=False)
        with tmp:
            tmp.write(text)
        del text
    read = Path(tmp.name) if tmp else path
    delim = csv_delimiter(path, source)
    # The header is read here (Python's csv module, the same dialect), so DuckDB's sniffer never
    # runs: nothing about the dialect is guessed, and an oversized record cannot stop a sniff.
    with open(read, encoding="utf-8-sig", errors="replace", newline="") as f:
        header = next(csv.reader(f, delimiter=delim, quotechar='"', doublequote=True, strict=False), None)
    if not header:
        if tmp:
            os.unlink(tmp.name)
        raise IngestError(f"cannot read CSV file {path}: no header row (the first record names the columns)")
    if len(set(header)) != len(header):
        if tmp:
            os.unlink(tmp.name)
        raise IngestError(f"cannot read CSV file {path}: the header names a column twice ({header})")
    columns = "{" + ", ".join(f"{_lit(c)}: 'VARCHAR'" for c in header) + "}"
    opts = (f"header = true, auto_detect = false, columns = {columns}, delim = {_lit(delim)}, quote = '\"', "
            f"escape = '\"', strict_mode = true, ignore_errors = true, max_line_size = {int(max_record_bytes) + 2}, "
            "store_rejects = true, rejects_table = '_ingest_csv_errors', rejects_scan = '_ingest_csv_scans'")
    scan = f"read_csv({_lit(literal_scan_path(read))}, {opts})"
    try:
        cur.execute("DROP TABLE IF EXISTS _ingest_csv_errors; DROP TABLE IF EXISTS _ingest_csv_scans")
        text, bad = _records_sql(cur, scan, max_record_bytes)
        good = cur.sql(f"SELECT {text} AS text FROM {scan}").to_arrow_table()
        errors = cur.sql("SELECT line - 1 AS row_number, any_value(error_type::VARCHAR), any_value(csv_line), "
                         "any_value(error_message) FROM _ingest_csv_errors GROUP BY line ORDER BY line").fetchall()
    except duckdb.Error as err:
        raise IngestError(f"cannot read CSV file {path}: {str(err).splitlines()[0]}") from err
    finally:
        if tmp:
            os.unlink(tmp.name)
    bad_rows = np.array([r[0] for r in errors], np.int64)
    total = good.num_rows + len(bad_rows)
    numbers = np.setdiff1d(np.arange(1, total + 1, dtype=np.int64), bad_rows)
    if len(numbers) != good.num_rows:   # DuckDB numbered differently (e.g. blank lines): fall back to order
        numbers = np.arange(1, good.num_rows + 1, dtype=np.int64)
    texts = good.column("text").combine_chunks().cast(pa.large_string())
    lengths = pc.binary_length(texts).to_numpy(zero_copy_only=False) if len(texts) else np.zeros(0)
    over = {int(i) for i in np.flatnonzero(lengths > max_record_bytes)}
    all_rows = np.concatenate([numbers, bad_rows])
    all_texts = pa.concat_arrays([texts, pa.nulls(len(bad_rows), pa.large_string())])
    pre = {i: ("oversized", f"the record is {int(lengths[i])} bytes as JSON, above the maximum record size of "
               f"{max_record_bytes} bytes (Ingestion.max_record_bytes)", texts[i].as_py()[:RAW_KEEP]) for i in over}
    kinds = {"INVALID ENCODING": "invalid_utf8", "LINE SIZE OVER MAXIMUM": "oversized"}
    for k, (_, kind, line, msg) in enumerate(errors):
        pre[good.num_rows + k] = (kinds.get(kind, "malformed_csv"), f"{kind}: {msg}", (line or "")[:RAW_KEEP])
    order = np.argsort(all_rows, kind="stable")
    position = {int(old): new for new, old in enumerate(order)}
    table = make_chunk(all_rows[order], all_texts.take(pa.array(order)), {position[i]: v for i, v in pre.items()})
    for start in range(0, table.num_rows, CHUNK_ROWS):
        yield table.slice(start, CHUNK_ROWS)
