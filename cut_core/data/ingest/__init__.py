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

    one statement (sql.validation_sql): validate, extract the canonical columns, decide
        polarity (cut_core.data.polarity, the rule judges use) and hash the id (md5 in DuckDB)
        into an Arrow table (not a temporary table: see run.py)
    warehouse.add_checked: find duplicates with hash joins (against the warehouse and within
        the chunk), write triplets and rejects with one INSERT each

The two run side by side (run.py): a thread reads and checks the next chunk on its own cursor
while the caller's thread writes this one into the file's transaction (DuckDB compresses an
insert on one thread), and the file is hashed while the first chunk is checked.

Conversations (a `messages` list, or TRL's conversational `prompt` + `completion`) are named by
the check statement and only those rows are rewritten in Python into flat records (response =
the last, assistant turn; instruction = the turns before it as text, the turns themselves kept
for `triplets.context`), then the chunk is checked again. `format="hf"` expands a `datasets`
folder into its Arrow files or Parquet shards (sources.hf_files); an Arrow file is read like Parquet.

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
  positive by cut_core.data.polarity's rule (a positive prefix after leading quotes and emphasis,
  case-insensitive), else negative. A negative that starts with a contradiction prefix is
  flagged (triplets.contradiction) or, with quarantine_contradictions, rejected. Blank
  judgments are stored as NULL.
- duplicate: same id as a triplet already in the warehouse or an earlier row of this run;
  id = warehouse.triplet_id(instruction, response, judgment), computed in DuckDB
  (warehouse.triplet_id_sql: the same bytes, the same md5).

The modules, one job each:

    report.py         REASONS, IngestError / RejectRateExceeded, FileReport / IngestReport, the gate
    sources.py        paths, globs and `datasets` folders -> files; format; file digest; check_sources
    chunks.py         CHUNK_SCHEMA, the shape every reader yields; UTF-16/32 detection and decoding;
                      prefetched (the next chunk made on a thread)
    jsonl.py          JSON lines (UTF-8 cut at newlines, UTF-16/32 per line, oversized lines)
    tables.py         JSON arrays, Parquet, Arrow IPC, CSV (read and rendered to JSON by DuckDB)
    conversations.py  messages / prompt+completion rows -> flat records
    sql.py            the validation statement and column paths ("a.b[*].c")
    run.py            the per-file loop: transaction, check, rewrite, write, count; ingest_sources

This package imports its modules on first use of a name (PEP 562): `cut_core.dsl` validates
column paths with `cut_core.data.ingest.sql`, and that must not load pyarrow and numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name -> the module that owns it
_OWNERS = {
    "report": ["REASONS", "IngestError", "RejectRateExceeded", "FileReport", "IngestReport",
               "check_reject_rate", "default_batch"],
    "sources": ["RULES_VERSION", "DEFAULT_MAX_RECORD_BYTES", "hf_files", "expand_paths", "detect_format",
                "file_digest", "check_sources"],
    "run": ["ingest_file", "ingest_files", "ingest_sources"],
    "sql": ["validation_sql", "explode_array", "is_path", "parse_path"],
}
_OWNER = {name: module for module, names in _OWNERS.items() for name in names}
__all__ = sorted(_OWNER)

if TYPE_CHECKING:
    from cut_core.data.ingest.report import (REASONS, FileReport, IngestError, IngestReport, RejectRateExceeded,
                                        check_reject_rate, default_batch)
    from cut_core.data.ingest.run import ingest_file, ingest_files, ingest_sources
    from cut_core.data.ingest.sources import (DEFAULT_MAX_RECORD_BYTES, RULES_VERSION, check_sources, detect_format,
                                         expand_paths, file_digest, hf_files)
    from cut_core.data.ingest.sql import explode_array, is_path, parse_path, validation_sql


def __getattr__(name: str):
    module = _OWNER.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
