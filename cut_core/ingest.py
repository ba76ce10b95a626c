"""Ingest triplet files into the warehouse: read, validate, quarantine, insert once.

Every format is first turned into the same narrow shape, one row per record:

    (row_number BIGINT, text VARCHAR)    -- text: the record as a JSON object, NULL when not UTF-8

JSONL lines are that shape already (the file's bytes are cut at newlines with numpy and handed
to DuckDB as an Arrow string array without copying); JSON arrays, Parquet and CSV records are
rendered to JSON by DuckDB. Then, per chunk of rows:

    worker thread   read the chunk; one SQL statement (ingest_sql.validation_sql) validates it,
                    extracts the canonical columns, decides polarity and lays out the bytes the
                    id hashes
    this thread     hash the ids (hashlib: SHA instructions, several times DuckDB's sha256)
    every ~PENDING_BYTES and at the end of the file: one flush finds the duplicates with hash
                    joins (against the warehouse and within the flush) and writes triplets and
                    rejects with one INSERT each

The two threads overlap (DuckDB and numpy release the GIL). Python touches single rows only
where they are bad (to keep the raw bytes of a non-UTF-8 line, to explain a JSON syntax error,
to fetch a duplicate's raw text). Phase timings are in FileReport.seconds.

Every row read ends in exactly one place: `triplets`, or `rejects` with its source, 1-based
row number, raw text, reason code and a detail. Blank lines in JSONL are not records and are
only counted. A file is ingested in one transaction and recorded in `ingested_files` under a
digest of its bytes and the source settings, so ingesting the same file again adds nothing.

The rules, in the order they are applied (the first that fails names the reason, REASONS):
- columns: instruction, input, response, judgment, refined are read from the keys Source.columns
  maps them to (canonical -> file column), else from their own names; without a mapping the
  response is `response`, or Alpaca's `output`. A present field must be a string or null
  (wrong_type); instruction and response must be non-blank. A non-blank input is appended to
  the instruction after one newline. (A mapping for `id` is accepted and not used.)
- polarity (Source.polarity): a row with no judgment field (and no score) is unlabeled, polarity
  NULL, as is every row of a `labeled=False` source; a judgment equal to a failed marker
  ($ERROR$, whitespace ignored) is rejected; score >= threshold is positive; otherwise a blank or
  null judgment is positive (negative when a score below the threshold was given), one starting
  with a positive prefix (case-insensitive) is positive, any other is negative. A negative that
  starts with a contradiction prefix is flagged (triplets.contradiction) or, with
  quarantine_contradictions, rejected. Blank judgments are stored as NULL.
- duplicate: same id as a triplet already in the warehouse or an earlier row of this run;
  id = warehouse.content_key(instruction, response, judgment): SQL lays out the same bytes
  (each part as 0x01 + UTF-8 text, or 0x00 for NULL, then 0x1f) and Python hashes them.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import os
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cut_core import dsl, ingest_sql
from cut_core.ingest_sql import ident as _ident
from cut_core.ingest_sql import lit as _lit

REASONS = {
    "invalid_utf8": "the line is not valid UTF-8",
    "malformed_json": "the line (or the whole JSON-array file) is not valid JSON",
    "not_an_object": "the record is valid JSON but not an object",
    "wrong_type": "a canonical field has the wrong JSON type (texts must be strings, score a number)",
    "missing_instruction": "the instruction is missing, null or blank",
    "missing_response": "the response is missing, null or blank",
    "failed_judgment": "the judgment is a failed-judge marker such as $ERROR$",
    "contradiction": "a negative judgment that says the response is perfect (quarantine_contradictions)",
    "duplicate": "same (instruction, response, judgment) as an earlier row or an existing triplet",
    "malformed_csv": "a CSV record DuckDB could not split into the header's columns",
}

# Bump when the validation rules change: the digest of a file includes it, so a file ingested
# under old rules is read again under new ones instead of being skipped.
RULES_VERSION = "1"
# JSONL is read in blocks of about this many bytes (cut at a newline): bounded memory for any
# file size, and blocks big enough that per-statement overhead vanishes.
CHUNK_BYTES = 64 << 20
# Parquet, CSV and JSON-array records are validated in batches of this many rows.
CHUNK_ROWS = 131_072


class IngestError(RuntimeError):
    """A source that cannot be read at all (no file matches, unknown format, unreadable file)."""


class RejectRateExceeded(IngestError):
    """More rows were rejected than `max_reject_rate` allows.

    Accepted rows and rejects are committed before this is raised (nothing is lost). `report` is
    the report as a dict (IngestReport.to_dict()), `ingest_report` the object, `rate` the
    rejected fraction the gate judged.
    """

    def __init__(self, report: "IngestReport", max_reject_rate: float):
        self.ingest_report = report
        self.report = report.to_dict()      # the shape flows and the CLI print
        self.max_reject_rate = max_reject_rate
        rows, rejected = report.gate_counts()
        self.rate = rejected / rows if rows else 0.0
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(report.rejected_by_reason.items())) or "none"
        super().__init__(
            f"ingest rejected {rejected} of {rows} rows ({self.rate:.1%}), above max_reject_rate "
            f"{max_reject_rate:.1%}; by reason: {reasons}. The {report.accepted} accepted rows and the "
            f"rejects are committed; inspect them with: SELECT reason, source, row_number, detail "
            f"FROM rejects WHERE batch = '{report.batch}'")


# ---------------------------------------------------------------- reports

@dataclass
class FileReport:
    """What one file contributed. A skipped file (same digest already ingested) read nothing;
    `earlier` then holds the figures recorded when it was ingested."""

    path: str
    format: str
    digest: str
    rows_read: int = 0
    accepted: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    positives: int = 0
    negatives: int = 0
    unlabeled: int = 0
    contradictions: int = 0
    blank_lines: int = 0
    skipped: bool = False
    earlier: dict | None = None
    # "digest" (hashing the file, while the worker validates), "check" (reading, validating, "hash"
    # (ids) as far as the digest did not hide them), "write" (dedupe, inserts, commit)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class IngestReport:
    """Counts of one ingest run over one or more sources; the sums are properties over `files`."""

    batch: str
    files: list[FileReport] = field(default_factory=list)

    def _sum(self, name: str) -> int:
        return sum(getattr(f, name) for f in self.files)

    rows_read = property(lambda self: self._sum("rows_read"))
    accepted = property(lambda self: self._sum("accepted"))
    rejected = property(lambda self: self._sum("rejected"))
    positives = property(lambda self: self._sum("positives"))
    negatives = property(lambda self: self._sum("negatives"))
    unlabeled = property(lambda self: self._sum("unlabeled"))
    contradictions = property(lambda self: self._sum("contradictions"))
    blank_lines = property(lambda self: self._sum("blank_lines"))

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.files:
            for reason, n in f.rejected_by_reason.items():
                out[reason] = out.get(reason, 0) + n
        return dict(sorted(out.items()))

    @property
    def skipped_files(self) -> list[str]:
        return [f.path for f in self.files if f.skipped]

    def gate_counts(self) -> tuple[int, int]:
        """(rows, rejected) the reject-rate gate judges: this run's rows plus, for files skipped
        as already ingested, the figures recorded then, so re-running a file that failed the gate
        fails again instead of passing because nothing new was read."""
        rows, rejected = self.rows_read, self.rejected
        for f in self.files:
            if f.skipped and f.earlier:
                rows += f.earlier["rows_read"]
                rejected += f.earlier["rejected"]
        return rows, rejected

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "rows_read": self.rows_read,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "rejected_by_reason": self.rejected_by_reason,
            "positives": self.positives,
            "negatives": self.negatives,
            "unlabeled": self.unlabeled,
            "contradictions": self.contradictions,
            "blank_lines": self.blank_lines,
            "skipped_files": self.skipped_files,
            "files": [asdict(f) for f in self.files],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "IngestReport":
        return cls(batch=data["batch"], files=[FileReport(**f) for f in data["files"]])

    @classmethod
    def combine(cls, reports: Sequence["IngestReport"], batch: str | None = None) -> "IngestReport":
        batch = batch or (reports[0].batch if reports else default_batch())
        return cls(batch=batch, files=[f for r in reports for f in r.files])


def check_reject_rate(report: IngestReport, max_reject_rate: float) -> None:
    """Raise RejectRateExceeded when the rejected fraction is above `max_reject_rate` (0..1)."""
    rows, rejected = report.gate_counts()
    if rows and rejected / rows > max_reject_rate:
        raise RejectRateExceeded(report, max_reject_rate)


def default_batch() -> str:
    return "ingest-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


# ---------------------------------------------------------------- files, formats, digests

_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_paths(patterns: Iterable[str], *, base: str | Path | None = None) -> list[Path]:
    """Files named by paths and glob patterns (`**` recurses), in the order given, each once.

    Relative patterns are taken against `base` (default: the working directory). A pattern that
    matches nothing is an error: a typo must not look like an empty source.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        p = Path(pattern)
        if base is not None and not p.is_absolute():
            p = Path(base) / p
        if _GLOB_CHARS.search(str(p)):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise IngestError(f"no file matches {pattern!r} (looked for {p})")
        elif p.is_dir():
            raise IngestError(f"{p} is a folder; name files or a glob such as {p}/*.jsonl")
        elif not p.is_file():
            raise IngestError(f"source file not found: {p}")
        else:
            matches = [p]
        for m in matches:
            # absolute but not resolved: the path a user (and glob) names is the one recorded
            m = Path(os.path.abspath(m))
            if m not in seen:
                seen.add(m)
                out.append(m)
    return out


_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonlines": "jsonl", ".json": "json",
               ".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


def detect_format(path: Path, declared: str = "auto") -> str:
    """jsonl | json | parquet | csv. A .json file whose first non-blank byte is not '[' is read
    as JSON lines (many .json files are), so 'json' always means a JSON array here."""
    fmt = declared if declared != "auto" else _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise IngestError(f"cannot tell the format of {path} from its extension; set Source.format "
                          "to one of jsonl, json, parquet, csv")
    if fmt == "json":
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b" \t\r\n\xef\xbb\xbf")
        if not head.startswith(b"["):
            fmt = "jsonl"
    return fmt


def file_digest(path: Path, source: dsl.Source, fmt: str) -> str:
    """sha256 of the file bytes + the settings that change what its rows become."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(hashlib.file_digest(f, "sha256").digest())
    settings = {"rules": RULES_VERSION, "format": fmt, "columns": source.columns,
                "polarity": source.polarity.model_dump(mode="json"), "labeled": source.labeled}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- readers: file -> (row_number, text) chunks

@dataclass
class _Chunk:
    table: pa.Table                                  # row_number int64, text large_string (NULL: not UTF-8)
    notes: dict[int, tuple[str, str]] = field(default_factory=dict)  # row_number -> (raw, detail), for rows Python explained
    # JSONL: the byte offsets in the file of the rows' lines (n + 1), so that a row's raw text can
    # be read again and the block need not stay in memory after validation
    line_offsets: np.ndarray | None = None

    def raw_texts(self, rows: Sequence[int], first_row: int, f) -> list[str]:
        """The raw text (line terminator stripped) of these rows of the chunk, which starts at
        `first_row`; `f` is the file, open for reading, for a chunk that keeps only line offsets."""
        if self.line_offsets is None:
            positions = np.searchsorted(self.table.column("row_number").to_numpy(), rows)
            return [t.rstrip("\r\n") for t in self.table.column("text").take(positions).to_pylist()]
        out = []
        for r in rows:
            start, end = int(self.line_offsets[r - first_row]), int(self.line_offsets[r - first_row + 1])
            # a good row's line; "replace" only matters if the file changed since it was read
            out.append(os.pread(f.fileno(), end - start, start).decode("utf-8", "replace").rstrip("\r\n"))
        return out

    def after_check(self) -> "_Chunk":
        """What a validated chunk keeps until its rows are written: enough to find a row's raw
        text (a duplicate's) again. A JSONL block is dropped: its lines can be read again."""
        if self.line_offsets is None:
            return self
        return _Chunk(pa.table({}), {}, self.line_offsets)


# The newline search and the UTF-8 drill-down work on pieces this size, which stay in the CPU
# cache (a whole-block `arr == 10` is 3-4x slower: it writes and rereads a 64 MB mask).
_SCAN_BYTES = 1 << 20
_SCAN_LINES = 1024


def _line_ends(arr: np.ndarray) -> np.ndarray:
    """Offsets just past each newline of `arr` (uint8), int64."""
    mask = np.empty(min(len(arr), _SCAN_BYTES), bool)
    parts = [np.zeros(0, np.int64)]
    for start in range(0, len(arr), _SCAN_BYTES):
        piece = arr[start:start + _SCAN_BYTES]
        parts.append(np.flatnonzero(np.equal(piece, 10, out=mask[:len(piece)])) + (start + 1))
    return np.concatenate(parts)


def _utf8_validity(text: pa.LargeStringArray, arr: np.ndarray, offsets: np.ndarray, first_row: int,
                   notes: dict[int, tuple[str, str]]) -> np.ndarray | None:
    """None when every line is UTF-8 (one vectorised check), else the per-line validity mask,
    with a note (raw text with U+FFFD, where the bad byte is) for each bad line.

    Only pieces of lines that fail Arrow's check are looked into, and in them only the lines
    with a non-ASCII byte are decoded one by one.
    """
    try:
        text.validate(full=True)
        return None
    except pa.ArrowInvalid:
        pass
    valid = np.ones(len(text), bool)
    for start in range(0, len(text), _SCAN_LINES):
        try:
            text.slice(start, _SCAN_LINES).validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        stop = min(start + _SCAN_LINES, len(text))
        lo, hi = offsets[start], offsets[stop]
        high = np.flatnonzero(arr[lo:hi] >= 0x80) + lo
        for i in np.unique(np.searchsorted(offsets, high, side="right") - 1):
            line = arr[offsets[i]:offsets[i + 1]].tobytes()
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                valid[i] = False
                notes[first_row + int(i)] = (
                    line.decode("utf-8", "replace").rstrip("\r\n"),
                    f"invalid UTF-8 byte 0x{line[err.start]:02x} at byte {err.start} of the line")
    return valid


def _lines_chunk(data: bytes | memoryview, first_row: int, file_pos: int = 0) -> _Chunk:
    """Cut `data` (whole lines) at newlines into an Arrow string array without copying the bytes.

    Each element keeps its line terminator: JSON allows trailing whitespace, and the raw text
    of a reject is stripped in SQL, so nothing per line happens in Python. Lines that are not
    UTF-8 become NULL (see _utf8_validity).
    """
    arr = np.frombuffer(data, np.uint8)
    ends = _line_ends(arr)
    if len(arr) and arr[-1] != 10:
        ends = np.append(ends, len(arr))
    n = len(ends)
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = ends
    rows = pa.array(np.arange(first_row, first_row + n, dtype=np.int64))
    offsets_buf, data_buf = pa.py_buffer(offsets), pa.py_buffer(data)
    text = pa.LargeStringArray.from_buffers(n, offsets_buf, data_buf)
    notes: dict[int, tuple[str, str]] = {}
    valid = _utf8_validity(text, arr, offsets, first_row, notes)
    if valid is not None:
        bitmap = pa.py_buffer(np.packbits(valid, bitorder="little"))
        text = pa.LargeStringArray.from_buffers(n, offsets_buf, data_buf, bitmap, int(n - valid.sum()))
    return _Chunk(pa.table({"row_number": rows, "text": text}), notes, offsets + file_pos)


def _read_jsonl(path: Path) -> Iterator[_Chunk]:
    """Blocks of about CHUNK_BYTES cut after a newline. Each block is one os.pread into a fresh
    bytes object (no zero-filled buffer, no carried partial line to copy: the next read starts
    where the last whole line ended); the chunk's Arrow array points into it."""
    next_row = 1
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        pos = 3 if os.pread(fd, 3, 0) == b"\xef\xbb\xbf" else 0   # a byte-order mark is not part of line 1
        want = CHUNK_BYTES
        while pos < size:
            data = os.pread(fd, min(want, size - pos), pos)
            if not data:    # the file shrank while we read it
                return
            cut = len(data) if pos + len(data) >= size else data.rfind(b"\n") + 1
            if cut == 0:    # one line longer than a block: read a bigger block
                want *= 2
                continue
            chunk = _lines_chunk(memoryview(data)[:cut], next_row, pos)
            next_row += chunk.table.num_rows
            pos, want = pos + cut, CHUNK_BYTES
            yield chunk


def _batches(reader: pa.RecordBatchReader, notes: dict[int, tuple[str, str]] | None = None) -> Iterator[_Chunk]:
    for batch in reader:
        table = pa.Table.from_batches([batch]).cast(pa.schema([("row_number", pa.int64()), ("text", pa.large_string())]))
        yield _Chunk(table, notes or {})


def _read_json_array(cur: duckdb.DuckDBPyConnection, path: Path) -> Iterator[_Chunk]:
    raw = path.read_bytes()
    try:
        text, lossy = raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        # Elements that hold the replacement character are the ones with bad bytes; a file
        # that is valid UTF-8 never takes this path, so a genuine U+FFFD is never misread.
        text, lossy = raw.decode("utf-8-sig", "replace"), True
    try:
        rel = cur.sql("SELECT key::BIGINT + 1 AS row_number, value::VARCHAR AS text FROM json_each($doc)",
                      params={"doc": text})
        table = rel.to_arrow_table()
    except duckdb.Error as err:
        # Not a parseable array: no record can be told from the next, so the file is one bad row.
        notes = {1: (text[:10_000], f"the file is not a valid JSON array: {str(err).splitlines()[0][:300]}")}
        yield _Chunk(pa.table({"row_number": pa.array([1], pa.int64()),
                               "text": pa.array(["\x00not json"], pa.large_string())}), notes)
        return
    notes: dict[int, tuple[str, str]] = {}
    if lossy:
        values = table.column("text").to_pylist()
        for i, v in enumerate(values):
            if "\ufffd" in v:
                notes[i + 1] = (v, "invalid UTF-8 bytes in this element (shown as U+FFFD)")
                values[i] = None
        table = table.set_column(1, "text", pa.array(values, pa.large_string()))
    yield from _batches(table.to_reader(CHUNK_ROWS), notes)


def _struct_of_columns(cur: duckdb.DuckDBPyConnection, scan: str) -> str:
    cols = [r[0] for r in cur.sql(f"DESCRIBE SELECT * FROM {scan}").fetchall()]
    return "struct_pack(" + ", ".join(f'{_ident(c)} := {_ident(c)}' for c in cols) + ")"


def _read_parquet(cur: duckdb.DuckDBPyConnection, path: Path) -> Iterator[_Chunk]:
    scan = f"read_parquet({_lit(str(path))})"
    try:
        struct = _struct_of_columns(cur, scan)
        rel = cur.sql(f"SELECT file_row_number + 1 AS row_number, to_json({struct})::VARCHAR AS text "
                      f"FROM read_parquet({_lit(str(path))}, file_row_number = true) ORDER BY file_row_number")
        yield from _batches(rel.to_arrow_reader(CHUNK_ROWS))
    except duckdb.Error as err:
        raise IngestError(f"cannot read Parquet file {path}: {err}") from err


def _read_csv(cur: duckdb.DuckDBPyConnection, path: Path) -> Iterator[_Chunk]:
    """CSV with a header row; row numbers count data records (the header is not a row).

    DuckDB sets aside records it cannot split (and non-UTF-8 ones) in a rejects table that
    names their record number; the good records get the remaining numbers in order.
    """
    opts = ("header = true, all_varchar = true, parallel = false, ignore_errors = true, "
            "store_rejects = true, rejects_table = '_ingest_csv_errors', rejects_scan = '_ingest_csv_scans'")
    scan = f"read_csv({_lit(str(path))}, {opts})"
    try:
        cur.execute("DROP TABLE IF EXISTS _ingest_csv_errors; DROP TABLE IF EXISTS _ingest_csv_scans")
        struct = _struct_of_columns(cur, scan)
        good = cur.sql(f"SELECT to_json({struct})::VARCHAR AS text FROM {scan}").to_arrow_table()
        errors = cur.sql("SELECT line - 1 AS row_number, any_value(error_type::VARCHAR), any_value(csv_line), "
                         "any_value(error_message) FROM _ingest_csv_errors GROUP BY line ORDER BY line").fetchall()
    except duckdb.Error as err:
        raise IngestError(f"cannot read CSV file {path}: {err}") from err
    bad_rows = np.array([r[0] for r in errors], np.int64)
    total = good.num_rows + len(bad_rows)
    numbers = np.setdiff1d(np.arange(1, total + 1, dtype=np.int64), bad_rows)
    if len(numbers) != good.num_rows:   # DuckDB numbered differently (e.g. blank lines): fall back to order
        numbers = np.arange(1, good.num_rows + 1, dtype=np.int64)
    table = pa.table({"row_number": numbers, "text": good.column("text").cast(pa.large_string())})
    notes: dict[int, tuple[str, str]] = {}
    if errors:
        notes = {int(r): (line or "", f"{kind}: {msg}") for r, kind, line, msg in errors}
        # Non-UTF-8 records become NULL text (invalid_utf8); records DuckDB could not split get a
        # text no JSON parser accepts, which the check names malformed_csv.
        texts = [None if kind == "INVALID ENCODING" else "\x00malformed_csv" for _, kind, _, _ in errors]
        bad = pa.table({"row_number": pa.array(bad_rows), "text": pa.array(texts, pa.large_string())})
        table = pa.concat_tables([table, bad]).sort_by("row_number")   # chunks must come in row order
    yield from _batches(table.to_reader(CHUNK_ROWS), notes)


# ---------------------------------------------------------------- checking, staging, writing

# Validated rows (Arrow, with the source text of non-JSONL chunks) wait in memory until about
# this many bytes are pending; then one flush dedupes them and writes them with one INSERT per
# table. Each flush scans triplets.id once, so fewer flushes are cheaper on a big warehouse;
# this size keeps the peak RSS of the 1M-row benchmark (546 MB) near 1.6 GB. DuckDB also keeps
# the blocks it has written cached (about 140 MB per 1M rows) until the memory limit evicts them.
PENDING_BYTES = 256 << 20


def _check(cur: duckdb.DuckDBPyConnection, chunk: _Chunk, check_sql: str) -> pa.Table:
    """The validation query (ingest_sql.validation_sql) over one chunk, as Arrow."""
    cur.register("_ingest_chunk", chunk.table)
    try:
        return cur.sql(check_sql).to_arrow_table()
    finally:
        cur.unregister("_ingest_chunk")


def _content_ids(payload: pa.ChunkedArray) -> pa.Array:
    """warehouse.content_key of every row whose payload is set (ingest_sql: the same bytes).

    One hashlib call per row over a slice of the Arrow data buffer (no Python string per field,
    no copy of the text); the digests become hex in one call, and an Arrow array of fixed
    64-character strings without a Python string per id.
    """
    sha256 = hashlib.sha256
    digests: list[bytes] = []
    for arr in payload.chunks:
        if len(arr) == 0:
            continue
        if arr.type != pa.string():
            arr = arr.cast(pa.string())
        _, offsets, data = arr.buffers()[:3]
        offs = np.frombuffer(offsets, np.int32, len(arr) + 1, arr.offset * 4).tolist()
        view = memoryview(data if data is not None else b"")
        digests.extend([sha256(view[a:b]).digest() for a, b in zip(offs, offs[1:])])
    n = len(digests)
    hex_ids = b"".join(digests).hex().encode()
    offsets = pa.py_buffer(np.arange(0, 64 * (n + 1), 64, dtype=np.int32))
    nulls = payload.is_null().to_numpy(zero_copy_only=False)
    validity = pa.py_buffer(np.packbits(~nulls, bitorder="little")) if nulls.any() else None
    return pa.StringArray.from_buffers(n, offsets, pa.py_buffer(hex_ids), validity, int(nulls.sum()))


def _explain_json_errors(checked: pa.Table, notes: dict[int, tuple[str, str]]) -> None:
    """Python's parser names the position of a syntax error; only the (rare) malformed rows pay."""
    bad = checked.select(["row_number", "reason", "raw"])
    bad = bad.filter(pc.equal(bad["reason"], "malformed_json"))
    for row_number, raw in zip(bad["row_number"].to_pylist(), bad["raw"].to_pylist()):
        if row_number in notes:
            continue
        try:
            json.loads(raw)
            detail = "not valid JSON"
        except (ValueError, RecursionError) as err:
            detail = f"not valid JSON: {err}"
        notes[row_number] = (raw, detail[:300])


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


@dataclass
class _Pending:
    """Rows validated (with ids) and not yet written, and where to find their raw text."""

    checked: list[pa.Table] = field(default_factory=list)
    chunks: list[tuple[int, _Chunk]] = field(default_factory=list)    # (first row, chunk.after_check())
    notes: dict[int, tuple[str, str]] = field(default_factory=dict)
    nbytes: int = 0

    def add(self, chunk: _Chunk, checked: pa.Table) -> None:
        first = chunk.table.column("row_number")[0].as_py() if chunk.table.num_rows else 0
        kept = chunk.after_check()
        self.checked.append(checked)
        self.chunks.append((first, kept))
        self.notes.update(chunk.notes)
        self.nbytes += checked.nbytes + kept.table.nbytes

    def raw_texts(self, rows: list[int], path: Path) -> list[str]:
        """Raw texts of pending rows (sorted row numbers), one chunk at a time."""
        out: list[str] = []
        firsts = [first for first, _ in self.chunks]
        with open(path, "rb") as f:
            i = 0
            while i < len(rows):
                k = bisect.bisect_right(firsts, rows[i]) - 1
                j = bisect.bisect_left(rows, firsts[k + 1]) if k + 1 < len(firsts) else len(rows)
                out.extend(self.chunks[k][1].raw_texts(rows[i:j], firsts[k], f))
                i = j
        return out


class _Stream:
    """An Arrow table that DuckDB reads through the Arrow C stream interface, once per scan.

    con.register() of a table inside a transaction keeps the table alive until the commit (the
    catalog keeps a dropped view for the transaction), so one large file, written in one
    transaction, would end up with all its rows in memory at once. Registering this holder and
    dropping its table after the flush leaves only the empty holder behind.
    """

    def __init__(self, table: pa.Table):
        self.table: pa.Table | None = table

    def __arrow_c_stream__(self, requested_schema=None):
        return self.table.__arrow_c_stream__(requested_schema)


def _flush(con: duckdb.DuckDBPyConnection, pending: _Pending, report: FileReport, params: dict) -> None:
    """Dedupe the pending rows against the warehouse and each other, count them, write them."""
    if not pending.checked:
        return
    notes = sorted(pending.notes.items())
    streams = {
        "_ingest_checked": _Stream(pa.concat_tables(pending.checked)),
        "_ingest_notes": _Stream(pa.table({
            "row_number": pa.array([r for r, _ in notes], pa.int64()),
            "raw": pa.array([n[0] for _, n in notes], pa.large_string()),
            "detail": pa.array([n[1] for _, n in notes], pa.large_string())})),
    }
    try:
        for name, stream in streams.items():
            con.register(name, stream)
        dups = con.sql(ingest_sql.DUPS_SQL, params={"source": params["source"]}).to_arrow_table()
        # the raw text of each duplicate (usually a handful), looked up in Python
        rows = dups.column("row_number").to_pylist()
        raw = pending.raw_texts(rows, Path(params["source"])) if rows else []
        streams["_ingest_dups"] = _Stream(dups.append_column("raw", pa.array(raw, pa.large_string())))
        con.register("_ingest_dups", streams["_ingest_dups"])
        for reason, polarity, contradiction, n in con.sql(ingest_sql.COUNT_SQL).fetchall():
            _count(report, reason, polarity, contradiction, n)
        for statement in ingest_sql.INSERT_SQL:
            con.execute(statement, params)
    finally:
        for name, stream in streams.items():
            con.unregister(name)
            stream.table = None
    pending.checked, pending.chunks, pending.notes, pending.nbytes = [], [], {}, 0


_END = object()


class _Ahead:
    """Iterates `items` in one worker thread, up to `depth` items ahead of the caller.

    The items are (chunk, validated chunk): the reader and the validation query run in the worker
    (DuckDB and numpy release the GIL) while the caller hashes ids and writes, so on two cores the
    two halves overlap; `depth` 2 keeps the worker busy through a flush.
    """

    def __init__(self, items: Iterator, depth: int, cursors: Sequence[duckdb.DuckDBPyConnection]):
        self._items, self._cursors = items, cursors
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ingest-check")
        self._queue = deque(self._pool.submit(next, items, _END) for _ in range(depth))

    def __iter__(self) -> Iterator:
        while True:
            item = self._queue.popleft().result()
            if item is _END:
                return
            self._queue.append(self._pool.submit(next, self._items, _END))
            yield item

    def close(self, interrupt: bool = False) -> None:
        """Drop what is queued, interrupt the running query if asked, wait for the worker."""
        for future in self._queue:
            future.cancel()
        if interrupt and any(not future.done() for future in self._queue):
            for cur in self._cursors:
                cur.interrupt()
        self._pool.shutdown(wait=True)


def ingest_file(con: duckdb.DuckDBPyConnection, path: str | Path, source: dsl.Source, *, batch: str) -> FileReport:
    """Ingest one file in one transaction; skip it when its digest is already recorded.

    The connection must be a writable warehouse connection (warehouse.connect) with no open
    transaction: this function commits the file's triplets, rejects and digest together, or
    nothing (it also turns the connection's progress bar off). `triplets.source` and
    `rejects.source` hold the file's absolute path, symlinks not resolved.
    """
    path = Path(os.path.abspath(path))
    fmt = detect_format(path, source.format)
    started = time.perf_counter()
    check_sql = ingest_sql.validation_sql(source)
    params = {"source": str(path), "batch": batch}
    reader = con.cursor()    # Parquet/CSV/JSON-array scans stream on their own cursor
    checker = con.cursor()   # validation runs on its own cursor, in the worker thread
    for c in (con, reader, checker):
        c.execute("SET enable_progress_bar = false")   # DuckDB would draw one on a terminal
    if fmt == "jsonl":
        chunks = _read_jsonl(path)
    elif fmt == "json":
        chunks = _read_json_array(reader, path)
    elif fmt == "parquet":
        chunks = _read_parquet(reader, path)
    else:
        chunks = _read_csv(reader, path)
    # The worker starts validating at once, while this thread hashes the file: the digest (a
    # second full read) costs no time on two cores, and a file already ingested stops the
    # worker before anything is written.
    ahead = _Ahead(((chunk, _check(checker, chunk, check_sql)) for chunk in chunks), 2, [reader, checker])
    pending = _Pending()
    seconds = {"digest": 0.0, "hash": 0.0, "write": 0.0}
    in_transaction = False

    def flush() -> None:
        # Validation stays outside any transaction; the writes to the warehouse tables happen in
        # one transaction that also records the digest.
        nonlocal in_transaction
        t = time.perf_counter()
        if not in_transaction:
            con.execute("BEGIN TRANSACTION")
            in_transaction = True
        _flush(con, pending, report, params)
        seconds["write"] += time.perf_counter() - t

    try:
        digest = file_digest(path, source, fmt)
        seconds["digest"] = time.perf_counter() - started
        report = FileReport(path=str(path), format=fmt, digest=digest)
        earlier = con.execute("SELECT path, rows_read, accepted, rejected, batch FROM ingested_files "
                              "WHERE digest = ?", [digest]).fetchall()
        if earlier:
            ahead.close(interrupt=True)
            p, rows_read, accepted, rejected, b = earlier[0]
            report.skipped = True
            report.earlier = {"path": p, "rows_read": rows_read, "accepted": accepted, "rejected": rejected,
                              "batch": b}
            return report
        for chunk, checked in ahead:
            t = time.perf_counter()
            ids = _content_ids(checked.column("payload"))
            checked = checked.drop_columns(["payload"]).append_column("id", ids)
            seconds["hash"] += time.perf_counter() - t
            pending.add(chunk, checked)
            _explain_json_errors(checked, pending.notes)
            del chunk, checked      # a JSONL block is freed here (pending keeps line offsets)
            if pending.nbytes > PENDING_BYTES:   # write what is validated, go on
                flush()
        flush()
        con.execute("INSERT INTO ingested_files (digest, path, rows_read, accepted, rejected, batch) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [digest, str(path), report.rows_read, report.accepted, report.rejected, batch])
        t = time.perf_counter()
        con.execute("COMMIT")
        seconds["write"] += time.perf_counter() - t
    except BaseException:
        ahead.close(interrupt=True)
        if in_transaction:
            con.execute("ROLLBACK")
        raise
    finally:
        ahead.close()
        chunks.close()
        reader.close()
        checker.close()
    # "check": reading, validating and hashing ids, as far as the digest and the writing did not
    # hide them; "write": dedupe, inserts and commit.
    seconds["check"] = time.perf_counter() - started - seconds["digest"] - seconds["write"]
    report.seconds = {k: round(v, 3) for k, v in seconds.items()}
    report.rejected_by_reason = dict(sorted(report.rejected_by_reason.items()))
    return report


def ingest_files(con: duckdb.DuckDBPyConnection, source: dsl.Source, *, max_reject_rate: float | None = None,
                 batch: str | None = None, base: str | Path | None = None) -> IngestReport:
    """Ingest every file of one DSL `Source` (paths and globs); see `ingest_sources`."""
    return ingest_sources(con, [source], max_reject_rate=max_reject_rate, batch=batch, base=base)


def ingest_sources(con: duckdb.DuckDBPyConnection, sources: Sequence[dsl.Source], *,
                   max_reject_rate: float | None = None, batch: str | None = None,
                   base: str | Path | None = None) -> IngestReport:
    """Ingest the files of several sources under one batch name and one reject-rate gate.

    Each file is committed on its own (its triplets, rejects and digest); a file already
    ingested with the same bytes and settings is skipped and listed in `skipped_files`.
    After all files, a rejected fraction above `max_reject_rate` raises RejectRateExceeded
    carrying the report (None: no gate). Returns the IngestReport.
    """
    batch = batch or default_batch()
    report = IngestReport(batch=batch)
    files = [(src, p) for src in sources for p in expand_paths(src.paths, base=base)]
    for src, path in files:
        report.files.append(ingest_file(con, path, src, batch=batch))
    if max_reject_rate is not None:
        check_reject_rate(report, max_reject_rate)
    return report
