"""Ingest triplet files into the warehouse: read, validate, quarantine, insert once.

Every format is first turned into the same narrow shape, one row per record:

    (row_number BIGINT, text VARCHAR)    -- text: the record as a JSON object, NULL when not UTF-8

JSONL lines are that shape already (the file's bytes are cut at newlines with numpy and handed
to DuckDB as an Arrow string array without copying); JSON arrays, Parquet and CSV records are
rendered to JSON by DuckDB. One SQL statement then validates a chunk of rows, extracts the
canonical columns, decides polarity and computes the content-hash id, so the good path never
runs Python per row. Python touches single rows only where they are bad (to keep the raw bytes
of a non-UTF-8 line and to explain a JSON syntax error).

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
  id = warehouse.content_key(instruction, response, judgment), computed in SQL with the same
  byte layout (sha256 over each part as 0x01 + UTF-8 text, or 0x00 for NULL, then 0x1f).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import duckdb
import numpy as np
import pyarrow as pa

from cut_core import dsl

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
# Whitespace set used to decide that a field or a judgment marker is blank.
_WS = " \t\n\r\f\v"


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
    seconds: dict[str, float] = field(default_factory=dict)   # "check" (read+validate), "write" (insert+commit)


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


def _lines_chunk(data: bytes | memoryview, first_row: int) -> _Chunk:
    """Cut `data` (whole lines) at newlines into an Arrow string array without copying the bytes.

    Each element keeps its line terminator: JSON allows trailing whitespace, and the raw text
    of a reject is stripped in SQL, so nothing per line happens in Python. Lines that are not
    UTF-8 become NULL; only lines with a non-ASCII byte are checked one by one, and only when
    the block as a whole fails Arrow's vectorised UTF-8 check.
    """
    arr = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(arr == 10) + 1
    if len(arr) and arr[-1] != 10:
        ends = np.append(ends, len(arr))
    n = len(ends)
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = ends
    rows = pa.array(np.arange(first_row, first_row + n, dtype=np.int64))
    offsets_buf, data_buf = pa.py_buffer(offsets), pa.py_buffer(data)
    text = pa.LargeStringArray.from_buffers(n, offsets_buf, data_buf)
    notes: dict[int, tuple[str, str]] = {}
    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        valid = np.ones(n, bool)
        for i in np.unique(np.searchsorted(ends, np.flatnonzero(arr >= 0x80), side="right")):
            line = bytes(data[offsets[i]:offsets[i + 1]])
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                valid[i] = False
                notes[first_row + int(i)] = (
                    line.decode("utf-8", "replace").rstrip("\r\n"),
                    f"invalid UTF-8 byte 0x{line[err.start]:02x} at byte {err.start} of the line")
        bitmap = pa.py_buffer(np.packbits(valid, bitorder="little"))
        text = pa.LargeStringArray.from_buffers(n, offsets_buf, data_buf, bitmap, int(n - valid.sum()))
    return _Chunk(pa.table({"row_number": rows, "text": text}), notes)


def _read_jsonl(path: Path) -> Iterator[_Chunk]:
    next_row = 1
    carry = b""
    with open(path, "rb") as f:
        if f.read(3) != b"\xef\xbb\xbf":     # a UTF-8 byte-order mark is not part of the first line
            f.seek(0)
        while True:
            # Read straight into a fresh buffer behind the carried partial line: the block is
            # never copied in Python, and the chunk's Arrow array points into this buffer.
            buf = bytearray(len(carry) + CHUNK_BYTES)
            buf[:len(carry)] = carry
            n = f.readinto(memoryview(buf)[len(carry):])
            data = memoryview(buf)[:len(carry) + n]
            if n == 0:
                if len(data):
                    yield _lines_chunk(data, next_row)
                return
            cut = buf.rfind(b"\n", 0, len(data)) + 1
            if cut == 0:            # one line longer than a block: keep reading until it ends
                carry = bytes(data)
                continue
            carry = bytes(data[cut:])
            chunk = _lines_chunk(data[:cut], next_row)
            next_row += chunk.table.num_rows
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


# ---------------------------------------------------------------- validation SQL

def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _pointer(key: str) -> str:
    """JSON pointer for a top-level key (handles '/', '~', spaces and dots in column names)."""
    return "/" + key.replace("~", "~0").replace("/", "~1")


def _prefix_regex(prefixes: list[str]) -> str | None:
    """RE2 pattern: optional leading whitespace, then one of the prefixes, case-insensitive."""
    if not prefixes:
        return None
    return r"^\s*(?i:" + "|".join(re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", p) for p in prefixes) + ")"


def _json_kind(type_expr: str) -> str:
    """SQL naming a json_type() result the way a person would ('a number', 'an array')."""
    return (f"CASE WHEN {type_expr} IN ('UBIGINT', 'BIGINT', 'DOUBLE') THEN 'a number' "
            f"WHEN {type_expr} IN ('ARRAY', 'OBJECT') THEN 'an ' || lower({type_expr}) "
            f"WHEN {type_expr} = 'VARCHAR' THEN 'a string' ELSE 'a ' || lower({type_expr}) END")


def _validation_sql(source: dsl.Source) -> str:
    """The query that checks `_ingest_chunk(row_number, text)`; its rows go to `_ingest_checked`.

    It yields one row per input row: `reason` NULL for a good row (which then carries
    its canonical columns, polarity and id) or a reason code with `detail` and `raw`.
    Every expression that only matters for some rows sits under a CASE, which DuckDB evaluates
    only for the rows that take that branch: the good path parses each line three times
    (validate, types, values) and hashes it once.
    """
    cols, pol = source.columns, source.polarity
    fields: dict[str, list[str]] = {
        "instruction": [cols.get("instruction", "instruction")],
        "input": [cols.get("input", "input")],
        # Alpaca files call the response `output`; an explicit mapping replaces both names.
        "response": [cols["response"]] if "response" in cols else ["response", "output"],
        "judgment": [cols.get("judgment", "judgment")],
        "refined": [cols.get("refined", "refined")],
    }
    if pol.score_column:
        fields["score"] = [cols.get(pol.score_column, pol.score_column)]
    keys = [k for names in fields.values() for k in names]
    paths = "[" + ", ".join(_lit(_pointer(k)) for k in keys) + "]"
    type_paths = "['$', " + paths[1:]

    def pick(name: str) -> tuple[str, str, str]:
        """(type, value, key-name expression) of a field, the first present of its names."""
        idx = [keys.index(k) + 1 for k in fields[name]]
        if len(idx) == 1:
            return f"ty[{idx[0] + 1}]", f"v[{idx[0]}]", _lit(fields[name][0])
        t = "COALESCE(" + ", ".join(f"ty[{i + 1}]" for i in idx) + ")"
        v = "CASE " + " ".join(f"WHEN ty[{i + 1}] IS NOT NULL THEN v[{i}]" for i in idx) + " END"
        k = "CASE " + " ".join(f"WHEN ty[{i + 1}] IS NOT NULL THEN {_lit(fields[name][j])}"
                               for j, i in enumerate(idx)) + f" ELSE {_lit(fields[name][0])} END"
        return t, v, k

    picked = []
    for name in fields:
        t, v, k = pick(name)
        picked.append(f"{t} AS {name}_t, {v} AS {name}_v, {k} AS {name}_k")
    text_fields = ["instruction", "input", "response", "judgment", "refined"]
    bad_text = [f"({n}_t IS NOT NULL AND {n}_t NOT IN ('VARCHAR', 'NULL'))" for n in text_fields]
    wrong = [f"CASE WHEN {b} THEN {n}_k || ' is ' || {_json_kind(n + '_t')} || ', expected a string' END"
             for b, n in zip(bad_text, text_fields)]
    if pol.score_column:
        bad_score = ("(score_t IS NOT NULL AND score_t NOT IN ('UBIGINT', 'BIGINT', 'DOUBLE', 'NULL') AND "
                     "NOT (score_t = 'VARCHAR' AND TRY_CAST(score_v AS DOUBLE) IS NOT NULL))")
        bad_text.append(bad_score)
        wrong.append(f"CASE WHEN {bad_score} THEN score_k || ' is ' || {_json_kind('score_t')} || ', expected a number' END")
        score = "TRY_CAST(score_v AS DOUBLE)"
        threshold = repr(float(pol.score_threshold))
    else:
        score, threshold = "NULL::DOUBLE", "NULL"

    positive_re, contra_re = _prefix_regex(pol.positive_prefixes), _prefix_regex(pol.contradiction_prefixes)
    is_positive_text = f"regexp_matches(judgment, {_lit(positive_re)})" if positive_re else "false"
    says_perfect = f"regexp_matches(judgment, {_lit(contra_re)})" if contra_re else "false"
    markers = [m.strip(_WS) for m in pol.failed_markers if m.strip(_WS)]
    longest = max((len(m) for m in markers), default=0) + 64
    is_failed = (f"(length(judgment) <= {longest} AND trim(judgment, {_lit(_WS)}) IN ({', '.join(map(_lit, markers))}))"
                 if markers else "false")
    labeled = "true" if source.labeled else "false"
    # blank: no non-whitespace character; the regex runs only when the first byte is not already
    # printable, which is almost never, instead of on every field of every row
    blank = "(CASE WHEN ascii({0}) > 32 THEN false ELSE NOT regexp_matches({0}, '\\S') END)"

    return f"""
WITH parsed AS (
    SELECT row_number, text,
           CASE WHEN text IS NULL THEN 'invalid_utf8'
                WHEN NOT json_valid(text) THEN
                     CASE WHEN text = chr(0) || 'malformed_csv' THEN 'malformed_csv'
                          WHEN {blank.format('text')} THEN 'blank' ELSE 'malformed_json' END
           END AS early
    FROM _ingest_chunk
), extracted AS (
    SELECT row_number, text, early,
           CASE WHEN early IS NULL THEN json_type(text, {type_paths}) END AS ty,
           CASE WHEN early IS NULL THEN json_extract_string(text, {paths}) END AS v
    FROM parsed
), fields AS (
    SELECT row_number, text, early, ty[1] AS top, {', '.join(picked)}, {score} AS score
    FROM extracted
), labelled AS (
    SELECT *,
           -- a judgment that is absent (no key) and no score: the row has not been judged yet
           {labeled} AND (judgment_t IS NOT NULL OR score IS NOT NULL) AS is_labeled,
           CASE WHEN {labeled} AND judgment_v IS NOT NULL AND NOT {blank.format('judgment_v')}
                THEN judgment_v END AS judgment
    FROM fields
), classified AS (
    SELECT *,
           CASE WHEN NOT is_labeled THEN NULL
                WHEN score >= {threshold} THEN 'positive'
                WHEN judgment IS NULL THEN CASE WHEN score IS NULL THEN 'positive' ELSE 'negative' END
                WHEN {is_positive_text} THEN 'positive'
                ELSE 'negative' END AS polarity
    FROM labelled
), checked AS (
    SELECT *,
           COALESCE(polarity = 'negative' AND judgment IS NOT NULL AND {says_perfect}, false) AS contradiction,
           CASE WHEN early IS NOT NULL THEN early
                WHEN top <> 'OBJECT' THEN 'not_an_object'
                WHEN {' OR '.join(bad_text)} THEN 'wrong_type'
                WHEN instruction_v IS NULL OR {blank.format('instruction_v')} THEN 'missing_instruction'
                WHEN response_v IS NULL OR {blank.format('response_v')} THEN 'missing_response'
                WHEN is_labeled AND judgment IS NOT NULL AND {is_failed} THEN 'failed_judgment'
           END AS reason0
    FROM classified
), final AS (
    SELECT *,
           CASE WHEN reason0 IS NULL AND contradiction AND {str(pol.quarantine_contradictions).lower()}
                THEN 'contradiction' ELSE reason0 END AS reason,
           CASE WHEN input_v IS NOT NULL AND NOT {blank.format('input_v')}
                THEN instruction_v || chr(10) || input_v ELSE instruction_v END AS instruction_full
    FROM checked
)
SELECT row_number, reason,
       CASE WHEN reason IS NULL THEN instruction_full END AS instruction,
       CASE WHEN reason IS NULL THEN response_v END AS response,
       CASE WHEN reason IS NULL THEN judgment END AS judgment,
       CASE WHEN reason IS NULL THEN polarity END AS polarity,
       CASE WHEN reason IS NULL THEN refined_v END AS refined,
       CASE WHEN reason IS NULL THEN contradiction END AS contradiction,
       -- warehouse.content_key(instruction, response, judgment): each part is \\x01 + text (or
       -- \\x00 for NULL), followed by \\x1f; sha256 hex
       CASE WHEN reason IS NULL THEN sha256(concat(
            chr(1), instruction_full, chr(31), chr(1), response_v, chr(31),
            CASE WHEN judgment IS NULL THEN chr(0) ELSE chr(1) || judgment END, chr(31))) END AS id,
       CASE WHEN reason IS NOT NULL AND reason NOT IN ('invalid_utf8', 'blank') THEN rtrim(text, chr(13) || chr(10)) END AS raw,
       CASE reason
            WHEN 'not_an_object' THEN 'the record is ' || {_json_kind('top')} || ', not an object'
            WHEN 'wrong_type' THEN concat_ws('; ', {', '.join(wrong)})
            WHEN 'missing_instruction' THEN CASE WHEN instruction_t IS NULL THEN 'no field ' || instruction_k
                 ELSE 'field ' || instruction_k || ' is null or blank' END
            WHEN 'missing_response' THEN CASE WHEN response_t IS NULL THEN 'no field ' || response_k
                 ELSE 'field ' || response_k || ' is null or blank' END
            WHEN 'failed_judgment' THEN 'field ' || judgment_k || ' is the failed-judge marker '
                 || trim(judgment, {_lit(_WS)})
            WHEN 'contradiction' THEN 'negative judgment that says the response is perfect: ' || left(judgment, 80)
       END AS detail
FROM final
"""


# ---------------------------------------------------------------- one chunk, one file, a run

_STAGE_DDL = """
CREATE OR REPLACE TEMP TABLE _ingest_dups (row_number BIGINT, raw VARCHAR, detail VARCHAR);
CREATE OR REPLACE TEMP TABLE _ingest_notes (row_number BIGINT, raw VARCHAR, detail VARCHAR);
DROP TABLE IF EXISTS _ingest_checked;
"""

# Good rows of the chunk starting at row $first that repeat a triplet already in the warehouse,
# a row of an earlier chunk of this file, or an earlier row of this chunk (the first one stays).
_DUPS_SQL = """
INSERT INTO _ingest_dups
WITH good AS (SELECT row_number, id FROM _ingest_checked WHERE reason IS NULL AND row_number >= $first),
stored AS (
    SELECT g.row_number, t.source AS first_source, t.row_number AS first_row, g.id
    FROM good g JOIN triplets t USING (id)
),
earlier AS (
    SELECT g.row_number, $source AS first_source, min(p.row_number) AS first_row, any_value(g.id) AS id
    FROM good g JOIN _ingest_checked p ON p.id = g.id AND p.reason IS NULL AND p.row_number < $first
    WHERE g.row_number NOT IN (SELECT row_number FROM stored)
    GROUP BY g.row_number
),
known AS (SELECT * FROM stored UNION ALL SELECT * FROM earlier),
repeats AS (SELECT id, min(row_number) AS first_row FROM good GROUP BY id HAVING count(*) > 1),
dups AS (
    SELECT * FROM known
    UNION ALL
    SELECT g.row_number, $source, r.first_row, g.id FROM good g JOIN repeats r USING (id)
    WHERE g.row_number <> r.first_row AND g.id NOT IN (SELECT id FROM known)
)
SELECT d.row_number, rtrim(k.text, chr(13) || chr(10)),
       'same triplet (id ' || left(d.id, 12) || ') as ' || d.first_source || ' row ' || d.first_row
FROM dups d JOIN _ingest_chunk k USING (row_number)
"""

_COUNT_SQL = """
SELECT CASE WHEN d.row_number IS NOT NULL THEN 'duplicate' ELSE c.reason END AS reason,
       c.polarity, c.contradiction, count(*) AS n
FROM _ingest_checked c LEFT JOIN _ingest_dups d USING (row_number)
WHERE c.row_number >= $first
GROUP BY ALL
"""

# One INSERT per table per file (or per PENDING_BYTES of it): DuckDB appends to a table with a
# primary key much faster in one statement than in many (1M rows: 6 s against 9 s with commit),
# and the pending rows bound the memory an ingest takes.
_FLUSH = ("""
INSERT INTO triplets (id, instruction, response, judgment, polarity, refined, contradiction, batch, source, row_number)
SELECT id, instruction, response, judgment, polarity, refined, contradiction, $batch, $source, row_number
FROM _ingest_checked c ANTI JOIN _ingest_dups d USING (row_number)
WHERE c.reason IS NULL
""", """
INSERT INTO rejects (source, row_number, raw, reason, detail, batch)
SELECT $source, row_number, raw, reason, detail, $batch FROM (
    SELECT c.row_number, COALESCE(n.raw, c.raw) AS raw, c.reason, COALESCE(n.detail, c.detail) AS detail
    FROM _ingest_checked c LEFT JOIN _ingest_notes n USING (row_number)
    WHERE c.reason IS NOT NULL AND c.reason <> 'blank'
    UNION ALL
    SELECT row_number, raw, 'duplicate', detail FROM _ingest_dups
) ORDER BY row_number
""")
PENDING_BYTES = 640 << 20     # peak memory is about 2.5x this (measured: 1M rows, 546 MB, 1.6 GB RSS)


def _explain_json_errors(con: duckdb.DuckDBPyConnection, notes: dict[int, tuple[str, str]], first: int) -> None:
    """Python's parser names the position of a syntax error; only the (rare) malformed rows pay."""
    rows = con.execute("SELECT row_number, raw FROM _ingest_checked WHERE reason = 'malformed_json' "
                       "AND row_number >= ?", [first]).fetchall()
    for row_number, raw in rows:
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


def _check_chunk(con: duckdb.DuckDBPyConnection, chunk: _Chunk, check_sql: str, report: FileReport,
                 source_name: str) -> None:
    """Validate one chunk into `_ingest_checked` (all its rows, each with its reason or NULL) and
    mark its duplicates in `_ingest_dups`; nothing is written to the warehouse tables yet."""
    if chunk.table.num_rows == 0:
        return
    first = chunk.table.column("row_number")[0].as_py()   # chunks come in row order
    con.register("_ingest_chunk", chunk.table)
    try:
        exists = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = '_ingest_checked' "
                             "AND temporary").fetchall()[0][0]
        con.execute(f"INSERT INTO _ingest_checked SELECT * FROM ({check_sql})" if exists
                    else f"CREATE TEMP TABLE _ingest_checked AS {check_sql}")
        notes = {r: n for r, n in chunk.notes.items() if r >= first}
        _explain_json_errors(con, notes, first)
        if notes:
            rows = sorted(notes.items())
            con.register("_ingest_chunk_notes", pa.table({
                "row_number": pa.array([r for r, _ in rows], pa.int64()),
                "raw": pa.array([n[0] for _, n in rows], pa.large_string()),
                "detail": pa.array([n[1] for _, n in rows], pa.large_string())}))
            con.execute("INSERT INTO _ingest_notes SELECT * FROM _ingest_chunk_notes")
            con.unregister("_ingest_chunk_notes")
        con.execute(_DUPS_SQL, {"source": source_name, "first": first})
        for reason, polarity, contradiction, n in con.execute(_COUNT_SQL, {"first": first}).fetchall():
            _count(report, reason, polarity, contradiction, n)
    finally:
        con.unregister("_ingest_chunk")


def ingest_file(con: duckdb.DuckDBPyConnection, path: str | Path, source: dsl.Source, *, batch: str) -> FileReport:
    """Ingest one file in one transaction; skip it when its digest is already recorded.

    The connection must be a writable warehouse connection (warehouse.connect) with no open
    transaction: this function commits the file's triplets, rejects and digest together, or
    nothing (it also turns the connection's progress bar off). `triplets.source` and
    `rejects.source` hold the file's absolute path, symlinks not resolved.
    """
    path = Path(os.path.abspath(path))
    fmt = detect_format(path, source.format)
    digest = file_digest(path, source, fmt)
    report = FileReport(path=str(path), format=fmt, digest=digest)
    earlier = con.execute("SELECT path, rows_read, accepted, rejected, batch FROM ingested_files WHERE digest = ?",
                          [digest]).fetchall()
    if earlier:
        p, rows_read, accepted, rejected, b = earlier[0]
        report.skipped = True
        report.earlier = {"path": p, "rows_read": rows_read, "accepted": accepted, "rejected": rejected, "batch": b}
        return report

    check_sql = _validation_sql(source)
    params = {"source": str(path), "batch": batch}
    con.execute("SET enable_progress_bar = false")   # DuckDB would draw one on a terminal
    reader = con.cursor()   # Parquet/CSV/JSON-array scans stream on their own cursor while `con` writes
    in_transaction = False
    started, writing = time.perf_counter(), 0.0

    def flush() -> None:
        # Validation fills temp tables outside any transaction (cheap autocommits); the writes
        # to the warehouse tables happen in one transaction that also records the digest.
        nonlocal in_transaction, writing
        t = time.perf_counter()
        if not in_transaction:
            con.execute("BEGIN TRANSACTION")
            in_transaction = True
        if con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = '_ingest_checked' "
                       "AND temporary").fetchall()[0][0]:
            for statement in _FLUSH:
                con.execute(statement, params)
        con.execute(_STAGE_DDL)
        writing += time.perf_counter() - t

    try:
        con.execute(_STAGE_DDL)
        if fmt == "jsonl":
            chunks = _read_jsonl(path)
        elif fmt == "json":
            chunks = _read_json_array(reader, path)
        elif fmt == "parquet":
            chunks = _read_parquet(reader, path)
        else:
            chunks = _read_csv(reader, path)
        pending = 0
        for chunk in chunks:
            _check_chunk(con, chunk, check_sql, report, params["source"])
            pending += chunk.table.nbytes
            if pending > PENDING_BYTES:     # a very large file: write what is validated, keep going
                flush()
                pending = 0
        flush()
        con.execute("INSERT INTO ingested_files (digest, path, rows_read, accepted, rejected, batch) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [digest, str(path), report.rows_read, report.accepted, report.rejected, batch])
        t = time.perf_counter()
        con.execute("COMMIT")
        writing += time.perf_counter() - t
        report.seconds = {"check": round(time.perf_counter() - started - writing, 3), "write": round(writing, 3)}
    except BaseException:
        if in_transaction:
            con.execute("ROLLBACK")
        raise
    finally:
        reader.close()
        con.execute("DROP TABLE IF EXISTS _ingest_checked; DROP TABLE IF EXISTS _ingest_dups; "
                    "DROP TABLE IF EXISTS _ingest_notes")
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
