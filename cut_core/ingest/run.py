"""Ingest triplet files into the warehouse: read, validate, quarantine, insert once.

Every format is first turned into the same narrow shape, one row per record (CHUNK_SCHEMA):

    (row_number BIGINT, text VARCHAR, pre_reason, pre_detail, pre_raw)

`text` is the record as a JSON object; `pre_reason` is set where the reader already rejected
the record (not UTF-8, not valid in the UTF-16/32 encoding its byte-order mark names, longer
than the maximum record size, a CSV record DuckDB could not split, a BINARY Parquet value that
is not UTF-8). JSONL lines are that shape already: the file's bytes are cut at newlines and
handed to DuckDB as an Arrow string array without copying (DuckDB's own line readers drop blank
lines and bad bytes without saying which line they were, and a reject must name its line).
JSON arrays (json_each), Parquet (read_parquet) and CSV (read_csv, explicit dialect, with its
reject table) are read and rendered to JSON by DuckDB. Then, per chunk, DuckDB does the rest:

    one statement (ingest_sql.validation_sql): validate, extract the canonical columns, decide
        polarity (cut_core.polarity, the rule judges use) and hash the id (sha256 in DuckDB)
        into a temporary table
    warehouse.add_checked: find duplicates with hash joins (against the warehouse and within
        the chunk), write triplets and rejects with one INSERT each

Conversations (a `messages` list, or TRL's conversational `prompt` + `completion`) are named by
the check statement and only those rows are rewritten in Python into flat records (response =
the last, assistant turn; instruction = the turns before it as text, the turns themselves kept
for `triplets.context`), then the chunk is checked again. `format="hf"` expands a `datasets`
folder into its Arrow files or Parquet shards (hf_files); an Arrow file is read like Parquet.

Python touches single rows only where they are bad (to keep the raw bytes of a non-UTF-8 line,
to explain a JSON syntax error). Phase timings are in FileReport.seconds.

Every row read ends in exactly one place: `triplets`, or `rejects` with its source, 1-based
row number, raw text, reason code and a detail. Blank lines in JSONL are not records and are
only counted. A file is ingested in one transaction and recorded in `ingested_files` under a
digest of its bytes and the source settings, so ingesting the same file again adds nothing.
Paths are read literally: a file named `a[12].parquet` is that file, never a glob.

The rules, in the order they are applied (the first that fails names the reason, REASONS):
- columns: instruction, input, response, judgment, refined are read from the keys Source.columns
  maps them to (canonical -> file column), else from their own names; without a mapping the
  response is `response`, or Alpaca's `output`. A present field must be a string or null
  (wrong_type); instruction and response must be non-blank. A non-blank input is appended to
  the instruction after one newline. (A mapping for `id` is accepted and not used.)
- polarity (Source.polarity): a row with no judgment field (and no score) is unlabeled, polarity
  NULL, as is every row of a `labeled=False` source; a judgment equal to a failed marker
  ($ERROR$, whitespace ignored) is rejected; score >= threshold is positive; otherwise a blank or
  null judgment is positive (negative when a score below the threshold was given), and a text is
  positive by cut_core.polarity's rule (a positive prefix after leading quotes and emphasis,
  case-insensitive), else negative. A negative that starts with a contradiction prefix is
  flagged (triplets.contradiction) or, with quarantine_contradictions, rejected. Blank
  judgments are stored as NULL.
- duplicate: same id as a triplet already in the warehouse or an earlier row of this run;
  id = warehouse.content_key(instruction, response, judgment), computed in DuckDB
  (warehouse.content_key_sql: the same bytes, the same sha256).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cut_core import dsl, templates
from cut_core import warehouse as wh
from cut_core.ingest import sql as ingest_sql
from cut_core.ingest.sql import ident as _ident
from cut_core.ingest.sql import lit as _lit

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
    "invalid_encoding": "the bytes are not valid in the UTF-16/32 encoding the file's byte-order mark names",
    "oversized": "the record is longer than the maximum record size (Ingestion.max_record_bytes)",
    "empty_array": "the array a column map explodes ([*]) is absent, empty or not an array",
    "malformed_messages": "a `messages` (or prompt/completion) conversation that does not end with the assistant "
                          "turn answering a user turn",
}

# Bump when the validation rules change: the digest of a file includes it, so a file ingested
# under old rules is read again under new ones instead of being skipped.
RULES_VERSION = "1"
# JSONL is read in blocks of about this many bytes (cut at a newline): bounded memory for any
# file size, and blocks big enough that per-statement overhead vanishes.
CHUNK_BYTES = 64 << 20
# Rows per Arrow record batch handed to DuckDB (zero-copy slices of a chunk): the unit its
# threads share a scan by.
SCAN_BATCH_ROWS = 8192
# Parquet, CSV and JSON-array records are validated in batches of this many rows.
CHUNK_ROWS = 131_072
# DuckDB's memory limit while a file is ingested (restored afterwards): the rows of a large file
# wait, uncommitted, in DuckDB's buffers until the commit; under this limit they go to disk
# instead (1M rows of the bench: peak RSS ~640 MB instead of ~1.4 GB).
INGEST_MEMORY_LIMIT = "300MB"
# A record longer than this (bytes of its line, or of its JSON rendering) is rejected as
# `oversized` without being parsed; dsl.Ingestion.max_record_bytes sets it per pipeline.
DEFAULT_MAX_RECORD_BYTES = dsl.DEFAULT_MAX_RECORD_BYTES


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
    # "digest" (hashing the file), "check" (reading, validating, hashing ids), "write" (dedupe,
    # inserts, commit)
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


def hf_files(folder: Path) -> list[Path]:
    """The data files of a Hugging Face `datasets` folder, in order: a save_to_disk Dataset
    (state.json lists its Arrow files), a DatasetDict (dataset_dict.json lists its splits, each
    such a folder), else hub-layout Parquet shards (e.g. data/train-00000-of-00002.parquet)."""
    state, splits = folder / "state.json", folder / "dataset_dict.json"
    try:
        if state.is_file():
            files = [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        elif splits.is_file():
            files = [f for split in json.loads(splits.read_text())["splits"] for f in hf_files(folder / split)]
        else:
            files = sorted(p for p in folder.rglob("*.parquet") if p.is_file())
    except (ValueError, KeyError, TypeError) as err:
        raise IngestError(f"{folder} is not a readable `datasets` folder: {err!r} in its state.json / "
                          "dataset_dict.json") from err
    if not files:
        raise IngestError(f"{folder} holds no `datasets` data: no state.json (save_to_disk), no dataset_dict.json "
                          "and no .parquet shards")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise IngestError(f"{folder}: files its state.json lists are missing: {missing[:3]}")
    return files


def expand_paths(patterns: Iterable[str], *, base: str | Path | None = None, folders: bool = False) -> list[Path]:
    """Files named by paths and glob patterns (`**` recurses), in the order given, each once.

    Relative patterns are taken against `base` (default: the working directory). A path that
    names an existing file is that file, even with * ? [ in its name; otherwise those characters
    make a glob. A pattern that matches nothing is an error: a typo must not look like an empty
    source.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        p = Path(pattern)
        if base is not None and not p.is_absolute():
            p = Path(base) / p
        if p.is_file():
            matches = [p]
        elif _GLOB_CHARS.search(str(p)):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise IngestError(f"no file matches {pattern!r} (looked for {p})")
        elif p.is_dir() and folders:
            matches = hf_files(p)
        elif p.is_dir():
            raise IngestError(f"{p} is a folder; name files or a glob such as {p}/*.jsonl (a Hugging Face "
                              "`datasets` folder: format='hf')")
        else:
            raise IngestError(f"source file not found: {p}")
        for m in matches:
            # absolute but not resolved: the path a user (and glob) names is the one recorded
            m = Path(os.path.abspath(m))
            if m not in seen:
                seen.add(m)
                out.append(m)
    return out


_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonlines": "jsonl", ".json": "json",
               ".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv", ".tab": "csv",
               ".arrow": "arrow"}


def detect_format(path: Path, declared: str = "auto") -> str:
    """jsonl | json | parquet | csv | arrow. A .json file whose first non-blank byte is not '['
    is read as JSON lines (many .json files are), so 'json' always means a JSON array here.
    'hf' (a `datasets` folder's files) is decided per file: .arrow or .parquet."""
    if declared == "hf":
        fmt = _EXTENSIONS.get(path.suffix.lower())
        if fmt not in ("arrow", "parquet"):
            raise IngestError(f"format='hf' reads `datasets` Arrow files and Parquet shards; {path} is neither")
        return fmt
    fmt = declared if declared != "auto" else _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise IngestError(f"cannot tell the format of {path} from its extension; set Source.format "
                          "to one of jsonl, json, parquet, csv, arrow, hf")
    if fmt == "json":
        with open(path, "rb") as f:
            head = f.read(4096)
        wide = wide_encoding(path)
        if wide:
            head = head[wide[2]:].decode(wide[0], "ignore").encode()
        if not head.lstrip(b" \t\r\n\xef\xbb\xbf").startswith(b"["):
            fmt = "jsonl"
    return fmt


def file_digest(path: Path, source: dsl.Source, fmt: str, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> str:
    """sha256 of the file bytes + the settings that change what its rows become. Settings added
    later (delimiter, max_record_bytes) enter only when they differ from their defaults, so a
    file ingested by an earlier release keeps its digest and is not read twice."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(hashlib.file_digest(f, "sha256").digest())
    settings = {"rules": RULES_VERSION, "format": fmt, "columns": source.columns,
                "polarity": source.polarity.model_dump(mode="json"), "labeled": source.labeled}
    if source.delimiter:
        settings["delimiter"] = source.delimiter
    if max_record_bytes != DEFAULT_MAX_RECORD_BYTES:
        settings["max_record_bytes"] = max_record_bytes
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- readers: file -> chunks of records

# Every reader yields Arrow tables of this shape, in row order: one row per record.
CHUNK_SCHEMA = pa.schema([("row_number", pa.int64()), ("text", pa.large_string()),
                          ("pre_reason", pa.string()), ("pre_detail", pa.large_string()),
                          ("pre_raw", pa.large_string())])
# Raw text kept for a record rejected before parsing (oversized, undecodable) is cut to this.
RAW_KEEP = 10_000


def _null_at(text: pa.Array, positions: Iterable[int]) -> pa.Array:
    """`text` (large_string) with NULL at these positions."""
    positions = sorted(positions)
    if not positions:
        return text
    if text.offset == 0 and text.null_count == 0:     # the zero-copy JSONL block: a validity bitmap
        valid = np.ones(len(text), bool)
        valid[positions] = False
        _, offsets, data = text.buffers()[:3]
        return pa.LargeStringArray.from_buffers(len(text), offsets, data,
                                                pa.py_buffer(np.packbits(valid, bitorder="little")),
                                                len(positions))
    values = text.to_pylist()
    for i in positions:
        values[i] = None
    return pa.array(values, pa.large_string())


def _chunk(rows, text: pa.Array, pre: dict[int, tuple[str, str, str]] | None = None) -> pa.Table:
    """A chunk from row numbers and texts; `pre` maps positions to (reason, detail, raw) of
    records the reader rejected (their text becomes NULL)."""
    n = len(rows)
    if not pre:
        return pa.table([pa.array(rows, pa.int64()), text, pa.nulls(n, pa.string()), pa.nulls(n, pa.large_string()),
                         pa.nulls(n, pa.large_string())], schema=CHUNK_SCHEMA)
    reasons, details, raws = [None] * n, [None] * n, [None] * n
    for i, (reason, detail, raw) in pre.items():
        reasons[i], details[i], raws[i] = reason, detail, raw
    return pa.table([pa.array(rows, pa.int64()), _null_at(text, pre), pa.array(reasons, pa.string()),
                     pa.array(details, pa.large_string()), pa.array(raws, pa.large_string())], schema=CHUNK_SCHEMA)


def _cut_lines(data, first_row: int, max_record_bytes: int, file_pos: int = 0) -> pa.Table:
    """Whole lines of UTF-8 bytes -> a chunk, without copying the bytes: the newline offsets
    (numpy) become the offsets of an Arrow string array over the block. Lines that are not
    UTF-8 or longer than max_record_bytes are rejected here (the only per-line Python)."""
    arr = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(arr == 10) + 1
    if len(arr) and arr[-1] != 10:
        ends = np.append(ends, len(arr))
    n = len(ends)
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = ends
    text = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))
    pre: dict[int, tuple[str, str, str]] = {}
    for i in np.flatnonzero(np.diff(offsets) > max_record_bytes + 2):   # + the line terminator
        line = bytes(arr[offsets[i]:offsets[i] + RAW_KEEP])
        pre[int(i)] = ("oversized", f"the record is {int(offsets[i + 1] - offsets[i])} bytes, above the maximum "
                       f"record size of {max_record_bytes} bytes (Ingestion.max_record_bytes)",
                       line.decode("utf-8", "replace"))
    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        # Only here, on a block that has a bad byte: find its lines (rare).
        for i in np.unique(np.searchsorted(offsets, np.flatnonzero(arr >= 0x80), side="right") - 1):
            if int(i) in pre:
                continue
            line = arr[offsets[i]:offsets[i + 1]].tobytes()
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                pre[int(i)] = ("invalid_utf8", f"invalid UTF-8 byte 0x{line[err.start]:02x} at byte {err.start} "
                               "of the line", line.decode("utf-8", "replace").rstrip("\r\n"))
    return _chunk(np.arange(first_row, first_row + n, dtype=np.int64), text, pre)


def _read_jsonl(path: Path, max_record_bytes: int) -> Iterator[pa.Table]:
    """Blocks of about CHUNK_BYTES cut after a newline (one os.pread each). A line longer than
    max_record_bytes is rejected without being held in memory: its bytes are skipped block by
    block up to the next newline, keeping the first RAW_KEEP for the reject."""
    next_row = 1
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        pos = 3 if os.pread(fd, 3, 0) == b"\xef\xbb\xbf" else 0   # a byte-order mark is not part of line 1
        while pos < size:
            data = os.pread(fd, min(CHUNK_BYTES, size - pos), pos)
            if not data:    # the file shrank while we read it
                return
            cut = len(data) if pos + len(data) >= size else data.rfind(b"\n") + 1
            if cut == 0:    # no newline in a whole block: one line longer than CHUNK_BYTES
                length, head, at = 0, data[:RAW_KEEP], pos
                while True:
                    nl = data.find(b"\n")
                    if nl >= 0 or at + len(data) >= size:
                        length += nl + 1 if nl >= 0 else len(data)
                        break
                    length, at = length + len(data), at + len(data)
                    data = os.pread(fd, min(CHUNK_BYTES, size - at), at)
                if length > max_record_bytes + 2:
                    detail = (f"the record is {length} bytes, above the maximum record size of {max_record_bytes} "
                              "bytes (Ingestion.max_record_bytes)")
                    yield _chunk([next_row], pa.array([None], pa.large_string()),
                                 {0: ("oversized", detail, head.decode("utf-8", "replace"))})
                    next_row, pos = next_row + 1, pos + length
                    continue
                data, cut = os.pread(fd, length, pos), length   # allowed: read it whole
            chunk = _cut_lines(memoryview(data)[:cut], next_row, max_record_bytes)
            next_row += chunk.num_rows
            pos += cut
            yield chunk


# Byte-order marks of the wide encodings (UTF-32 first: its little-endian mark starts like UTF-16's).
_WIDE_BOMS = [(b"\xff\xfe\x00\x00", "utf-32-le", "<u4"), (b"\x00\x00\xfe\xff", "utf-32-be", ">u4"),
              (b"\xff\xfe", "utf-16-le", "<u2"), (b"\xfe\xff", "utf-16-be", ">u2")]


def wide_encoding(path: Path) -> tuple[str, str, int] | None:
    """(codec, numpy code-unit dtype, BOM length) of a file marked as UTF-16/32, else None."""
    with open(path, "rb") as f:
        head = f.read(4)
    for bom, codec, dtype in _WIDE_BOMS:
        if head.startswith(bom):
            return codec, dtype, len(bom)
    return None


def _read_wide_lines(path: Path, codec: str, dtype: str, bom: int, max_record_bytes: int) -> Iterator[pa.Table]:
    """JSON lines in UTF-16/32: lines cut at the newline code unit, each decoded strictly; a
    line that is not valid in the encoding is rejected as invalid_encoding, naming it."""
    unit = np.dtype(dtype).itemsize
    block = max(unit, CHUNK_BYTES // unit * unit)
    next_row = 1
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        pos, carry = bom, b""
        while pos < size or carry:
            data = carry + (os.pread(fd, min(block, size - pos), pos) if pos < size else b"")
            pos += len(data) - len(carry)
            usable = len(data) // unit * unit
            units = np.frombuffer(data[:usable], dtype)
            ends = (np.flatnonzero(units == 10) + 1) * unit
            if pos >= size:
                if usable and (not len(ends) or ends[-1] != usable):
                    ends = np.append(ends, usable)
                carry = b""
                if usable != len(data):          # a dangling odd byte: part of the last line
                    ends = np.append(ends[:-1], len(data)) if len(ends) else np.array([len(data)])
            else:
                if not len(ends):
                    carry = data
                    continue
                carry = data[ends[-1]:]
            starts = np.concatenate([[0], ends[:-1]])
            texts, pre = [], {}
            for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
                raw = data[a:b]
                try:
                    line = raw.decode(codec)
                except UnicodeDecodeError as err:
                    texts.append(None)
                    pre[i] = ("invalid_encoding", f"the file is marked {codec.upper()} by its byte-order mark, and "
                              f"this line is not valid {codec.upper()} ({err.reason} at byte {err.start})",
                              raw.decode(codec, "replace").rstrip("\r\n")[:RAW_KEEP])
                    continue
                if len(line.encode()) > max_record_bytes + 2:
                    texts.append(None)
                    pre[i] = ("oversized", f"the record is {len(line.encode())} bytes as UTF-8, above the maximum "
                              f"record size of {max_record_bytes} bytes (Ingestion.max_record_bytes)", line[:RAW_KEEP])
                    continue
                texts.append(line)
            if texts:
                yield _chunk(np.arange(next_row, next_row + len(texts)), pa.array(texts, pa.large_string()), pre)
                next_row += len(texts)
            if pos >= size:
                return


def _decoded_text(path: Path) -> tuple[str, str | None]:
    """The text of a whole file (JSON arrays, CSV in a wide encoding) and, when its bytes are
    not valid in its encoding, why (naming the encoding)."""
    raw = path.read_bytes()
    wide = wide_encoding(path)
    codec, skip = (wide[0], wide[2]) if wide else ("utf-8-sig", 0)
    try:
        return raw[skip:].decode(codec), None
    except UnicodeDecodeError as err:
        name = "UTF-8" if codec == "utf-8-sig" else f"{codec.upper()} (by its byte-order mark)"
        return raw[skip:].decode(codec, "replace"), f"{err.reason} at byte {err.start + skip}: the file is not valid {name}"


def _read_json_array(cur: duckdb.DuckDBPyConnection, path: Path, max_record_bytes: int) -> Iterator[pa.Table]:
    """A JSON array: DuckDB's json_each splits it into elements (1-based row numbers)."""
    text, bad = _decoded_text(path)
    reason = "invalid_utf8" if bad and wide_encoding(path) is None else "invalid_encoding"
    try:
        rel = cur.sql("SELECT key::BIGINT + 1 AS row_number, value::VARCHAR AS text FROM json_each($doc)",
                      params={"doc": text})
        table = rel.to_arrow_table()
    except duckdb.Error as err:
        # Not a parseable array: no record can be told from the next, so the file is one bad row.
        detail = f"the file is not a valid JSON array: {str(err).splitlines()[0][:300]}"
        yield _chunk([1], pa.array([None], pa.large_string()), {0: ("malformed_json", detail, text[:RAW_KEEP])})
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
            yield _chunk(rows[start:start + CHUNK_ROWS], texts.slice(start, CHUNK_ROWS), part)


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
            yield _chunk(table.column("row_number").to_numpy(), table.column("text").combine_chunks()
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
        yield _chunk(table.column("row_number").to_numpy(), pa.array(texts, pa.large_string()), pre)


def _read_parquet(cur: duckdb.DuckDBPyConnection, path: Path, max_record_bytes: int) -> Iterator[pa.Table]:
    scan = f"read_parquet({_lit(literal_scan_path(path))}, file_row_number = true)"
    try:
        text, bad = _records_sql(cur, scan, max_record_bytes)
        yield from _from_records(cur, f"SELECT file_row_number + 1 AS row_number, {text} AS text, {bad} AS bad "
                                      f"FROM {scan} ORDER BY file_row_number", max_record_bytes)
    except duckdb.Error as err:
        raise IngestError(f"cannot read Parquet file {path}: {str(err).splitlines()[0]}") from err


def _read_arrow(cur: duckdb.DuckDBPyConnection, path: Path, max_record_bytes: int) -> Iterator[pa.Table]:
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


# ---------------------------------------------------------------- conversations: messages and prompt/completion

def _json_kind(value) -> str:
    return {list: "an array", dict: "an object", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _conversation(rec: dict, msgs_key: str, instr_key: str, resp_key: str) -> tuple[dict | None, tuple | None]:
    """A `messages` record (or TRL's conversational prompt/completion) -> (flat record, None), or
    (None, (reason, detail)) when it cannot be one, or (None, None) when it is not a conversation."""
    if isinstance(rec.get(msgs_key), list):
        turns, where, drop = rec[msgs_key], msgs_key, (msgs_key,)
    elif isinstance(rec.get("prompt"), list) and isinstance(rec.get("completion"), list):
        turns, where, drop = rec["prompt"] + rec["completion"], "prompt + completion", ("prompt", "completion")
    else:
        return None, None
    if instr_key in rec or resp_key in rec:
        return None, ("malformed_messages", f"the record has both {where} and a {instr_key!r}/{resp_key!r} field; "
                      "a row is a conversation or an instruction, not both")
    for k, t in enumerate(turns):
        if not isinstance(t, dict):
            return None, ("wrong_type", f"{where}[{k}] is {_json_kind(t)}, expected an object {{role, content}}")
        for key in ("role", "content"):
            if not isinstance(t.get(key), str):
                got = "absent" if key not in t else _json_kind(t[key])
                return None, ("wrong_type", f"{where}[{k}].{key} is {got}, expected a string")
    last = max((k for k, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        return None, ("missing_response", f"{where} has no assistant turn")
    if last != len(turns) - 1:
        return None, ("malformed_messages", f"{where} has {len(turns) - 1 - last} turn(s) after its last assistant "
                      f"turn ({where}[{last}]); the judged response is the conversation's last turn")
    if last == 0 or turns[last - 1]["role"] != "user":
        before = "nothing" if last == 0 else f"a {turns[last - 1]['role']!r} turn"
        return None, ("missing_instruction", f"{where}[{last}] (the response) follows {before}, not a user turn")
    prompt = turns[:last]
    if not turns[last]["content"].strip(ingest_sql.WS):
        return None, ("missing_response", f"{where}[{last}].content (the response) is blank")
    if not prompt[-1]["content"].strip(ingest_sql.WS):
        return None, ("missing_instruction", f"{where}[{last - 1}].content (the user turn) is blank")
    out = {k: v for k, v in rec.items() if k not in drop}
    out[instr_key] = templates.conversation_text(prompt)
    out[resp_key] = turns[last]["content"]
    context = templates.context_json(prompt)
    if context is not None:
        out[ingest_sql.CONTEXT_KEY] = context
    return out, None


def _conversations(chunk: pa.Table, source: dsl.Source, row_numbers: Sequence[int]) -> pa.Table:
    """Rewrite the chunk's conversation rows (a `messages` list, or TRL's conversational `prompt`
    and `completion` lists; the validation query names them by `row_numbers`) into flat records:
    the response is the last (assistant) turn, the instruction the turns before it as text, their
    turns under ingest_sql.CONTEXT_KEY. A conversation that cannot be a triplet is rejected here,
    with its reason. The record as read stays in pre_raw, so a reject shows it."""
    cols = source.columns
    msgs_key = cols.get("messages", "messages")
    rows = np.searchsorted(chunk.column("row_number").to_numpy(), np.asarray(row_numbers, np.int64))
    text = chunk.column("text")
    instr_key = cols.get("instruction", "instruction")
    resp_key = cols.get("response", "response")
    texts = text.to_pylist()
    reasons = chunk.column("pre_reason").to_pylist()
    details = chunk.column("pre_detail").to_pylist()
    raws = chunk.column("pre_raw").to_pylist()
    for i in rows.tolist():
        try:
            rec = json.loads(texts[i])
        except (ValueError, RecursionError):
            continue   # the query names it malformed_json
        if not isinstance(rec, dict):
            continue
        flat, bad = _conversation(rec, msgs_key, instr_key, resp_key)
        if flat is None and bad is None:
            continue
        raws[i] = texts[i].rstrip("\r\n")
        if bad is not None:
            reasons[i], details[i], texts[i] = bad[0], bad[1], None
        else:
            texts[i] = json.dumps(flat, ensure_ascii=False)
    return pa.table([chunk.column("row_number"), pa.array(texts, pa.large_string()), pa.array(reasons, pa.string()),
                     pa.array(details, pa.large_string()), pa.array(raws, pa.large_string())], schema=CHUNK_SCHEMA)


def csv_delimiter(path: Path, source: dsl.Source) -> str:
    """The declared delimiter, else by extension: tab for .tsv/.tab, a comma otherwise."""
    if source.delimiter:
        return source.delimiter
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def _read_csv(cur: duckdb.DuckDBPyConnection, path: Path, source: dsl.Source,
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
        text, bad = _decoded_text(path)
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
    table = _chunk(all_rows[order], all_texts.take(pa.array(order)), {position[i]: v for i, v in pre.items()})
    for start in range(0, table.num_rows, CHUNK_ROWS):
        yield table.slice(start, CHUNK_ROWS)


# ---------------------------------------------------------------- checking and writing

class _Stream:
    """An Arrow table that DuckDB reads through the Arrow C stream interface, once per scan.

    con.register() of a table inside a transaction keeps the table alive until the commit (the
    catalog keeps a dropped view for the transaction), so a large file, written in one
    transaction, would keep every block in memory until the end. Registering this holder and
    dropping its table once the chunk is written leaves only the empty holder behind.
    """

    def __init__(self, table: pa.Table):
        self.table: pa.Table | None = table

    def __arrow_c_stream__(self, requested_schema=None):
        return self.table.__arrow_c_stream__(requested_schema)


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


def _explain_json_errors(cur: duckdb.DuckDBPyConnection) -> None:
    """Python's parser names the position of a syntax error; only the (rare) malformed rows pay."""
    bad = cur.sql("SELECT row_number, raw FROM _ingest_checked WHERE reason = 'malformed_json' "
                  "AND detail IS NULL").fetchall()
    if not bad:
        return
    details = []
    for _, raw in bad:
        try:
            json.loads(raw)
            details.append("not valid JSON")
        except (ValueError, RecursionError) as err:
            details.append(f"not valid JSON: {err}"[:300])
    explained = pa.table({"row_number": pa.array([r for r, _ in bad], pa.int64()), "detail": details})
    cur.register("_ingest_explained", explained)
    try:
        cur.execute("UPDATE _ingest_checked c SET detail = e.detail FROM _ingest_explained e "
                    "WHERE c.row_number = e.row_number")
    finally:
        cur.unregister("_ingest_explained")


def ingest_file(con: duckdb.DuckDBPyConnection, path: str | Path, source: dsl.Source, *, batch: str,
                max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> FileReport:
    """Ingest one file in one transaction; skip it when its digest is already recorded.

    The connection must be a writable warehouse connection (warehouse.connect) with no open
    transaction: this function commits the file's triplets, rejects and digest together, or
    nothing. `triplets.source` and `rejects.source` hold the file's absolute path, symlinks not
    resolved. Each chunk of records is checked by one DuckDB statement (ingest_sql) into a
    temporary table and written by warehouse.add_checked, so memory stays bounded by the chunk.
    """
    path = Path(os.path.abspath(path))
    fmt = detect_format(path, source.format)
    started = time.perf_counter()
    seconds = {"digest": 0.0, "check": 0.0, "write": 0.0}
    digest = file_digest(path, source, fmt, max_record_bytes)
    seconds["digest"] = time.perf_counter() - started
    report = FileReport(path=str(path), format=fmt, digest=digest)
    earlier = wh.ingested_file(con, digest)
    if earlier:
        report.skipped, report.earlier = True, earlier
        return report

    check_sqls = {False: ingest_sql.validation_sql(source),
                  True: ingest_sql.validation_sql(source, context=True)}
    cur = con.cursor()    # the reader's scans stream on their own cursor
    con.execute("SET enable_progress_bar = false")   # DuckDB would draw one on a terminal
    cur.execute("SET enable_progress_bar = false")
    wide = wide_encoding(path)
    if fmt == "jsonl":
        chunks = (_read_wide_lines(path, *wide, max_record_bytes) if wide
                  else _read_jsonl(path, max_record_bytes))
    elif fmt == "json":
        chunks = _read_json_array(cur, path, max_record_bytes)
    elif fmt == "parquet":
        chunks = _read_parquet(cur, path, max_record_bytes)
    elif fmt == "arrow":
        chunks = _read_arrow(cur, path, max_record_bytes)
    else:
        chunks = _read_csv(cur, path, source, max_record_bytes)
    previous_limit = con.sql("SELECT current_setting('memory_limit')").fetchall()[0][0]
    con.execute(f"SET memory_limit = '{INGEST_MEMORY_LIMIT}'")
    con.execute("BEGIN TRANSACTION")
    try:
        while True:
            t = time.perf_counter()
            chunk = next(chunks, None)
            if chunk is None:
                break
            # many small record batches: DuckDB scans an Arrow stream batch by batch on every core
            # (one 64 MB batch would hold every statement over the chunk to one thread)
            stream = _Stream(pa.Table.from_batches(chunk.to_batches(max_chunksize=SCAN_BATCH_ROWS)))
            del chunk
            con.register("_ingest_chunk", stream)
            try:
                con.execute(f"CREATE OR REPLACE TEMP TABLE _ingest_checked AS {check_sqls[False]}")
                conversations = [r[0] for r in con.sql(
                    "SELECT row_number FROM _ingest_checked WHERE reason = $r ORDER BY 1",
                    params={"r": ingest_sql.CONVERSATION}).fetchall()]
                if conversations:   # rewrite those rows (Python, these rows only) and check again
                    con.unregister("_ingest_chunk")
                    stream.table = _conversations(stream.table, source, conversations)
                    con.register("_ingest_chunk", stream)
                    con.execute(f"CREATE OR REPLACE TEMP TABLE _ingest_checked AS {check_sqls[True]}")
                _explain_json_errors(con)
                seconds["check"] += time.perf_counter() - t
                t = time.perf_counter()
                # the chunk stays visible for the raw text of duplicates (good rows keep none)
                for reason, polarity, contradiction, n in wh.add_checked(
                        con, "_ingest_checked", source=str(path), batch=batch, digest=digest, lines="_ingest_chunk"):
                    _count(report, reason, polarity, contradiction, n)
            finally:
                con.unregister("_ingest_chunk")
                stream.table = None     # the block goes now, not at the commit
            con.execute("DROP TABLE _ingest_checked")
            seconds["write"] += time.perf_counter() - t
        t = time.perf_counter()
        wh.record_ingested_file(con, digest=digest, path=str(path), rows_read=report.rows_read,
                                accepted=report.accepted, rejected=report.rejected, batch=batch)
        con.execute("COMMIT")
        seconds["write"] += time.perf_counter() - t
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        chunks.close()
        cur.close()
        con.execute(f"SET memory_limit = '{previous_limit}'")
    report.seconds = {k: round(v, 3) for k, v in seconds.items()}
    report.rejected_by_reason = dict(sorted(report.rejected_by_reason.items()))
    return report


def check_sources(sources: Sequence[dsl.Source], *, base: str | Path | None = None) -> list[tuple[dsl.Source, Path]]:
    """The files of the sources with their formats checked, before anything is opened for
    writing: raises IngestError (a missing file, a pattern matching nothing, an unknown format)."""
    files = [(src, p) for src in sources for p in expand_paths(src.paths, base=base, folders=src.format == "hf")]
    for src, p in files:
        detect_format(p, src.format)
    return files


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
