"""The warehouse's schema, its migrations, the content keys and triplet ids (the same digests in
Python and in DuckDB) and `connect` (one writer per file; the schema made and migrated on open)."""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from pathlib import Path
from typing import Iterator

import duckdb


SCHEMA = """
CREATE TABLE IF NOT EXISTS triplets (
    -- md5 of instruction, response, judgment (triplet_id; sha256 before warehouse_meta said
    -- 'triplet_ids' = 'md5'). Not a PRIMARY KEY: that index (an ART over random keys) cost as
    -- much as the compressed insert itself,
    -- ~2.4 s per 1M rows; writers check for the id before they insert (ingest with hash joins,
    -- tasks/label.py with NOT IN). Files created with the key keep it and work the same.
    id            VARCHAR NOT NULL,
    instruction   VARCHAR NOT NULL,         -- with a non-empty `input` appended after a newline; a
                                            -- multi-turn prompt as text (templates.conversation_text)
    response      VARCHAR NOT NULL,
    judgment      VARCHAR,                  -- NULL for positives without text and for unlabeled rows
    polarity      VARCHAR,                  -- 'positive' | 'negative' | NULL (unlabeled, awaits the judge)
    refined       VARCHAR,                  -- optional corrected response (ILF-MLE, ILF-DPO)
    score         DOUBLE,                   -- optional scalar reward from the source (DPO pairs)
    contradiction BOOLEAN DEFAULT FALSE,    -- negative whose text says the response is perfect
    batch         VARCHAR NOT NULL,         -- ingest batch or online iteration that produced the row
    source        VARCHAR NOT NULL,
    row_number    BIGINT NOT NULL,
    ingested_at   TIMESTAMP DEFAULT current_timestamp,
    file_digest   VARCHAR,                  -- ingested_files.digest of the file the row came from
    context       VARCHAR,                  -- a multi-turn prompt's turns as JSON [{role, content}, ...]
                                            -- ending with the user turn (templates.context_json);
                                            -- NULL for a flat instruction. Part of the id when set.
    element       INTEGER                   -- 0-based index in the exploded array of row_number
                                            -- (a column map with [*]); NULL when the row was not exploded
);
CREATE TABLE IF NOT EXISTS rejects (
    source        VARCHAR NOT NULL,
    row_number    BIGINT NOT NULL,
    raw           VARCHAR,
    reason        VARCHAR NOT NULL,
    detail        VARCHAR,
    batch         VARCHAR NOT NULL,
    rejected_at   TIMESTAMP DEFAULT current_timestamp,
    element       INTEGER                   -- as triplets.element: the array element of row_number
);
CREATE TABLE IF NOT EXISTS ingested_files (
    digest        VARCHAR PRIMARY KEY,      -- sha256 of the file bytes + the source settings
    path          VARCHAR NOT NULL,
    rows_read     BIGINT NOT NULL,
    accepted      BIGINT NOT NULL,
    rejected      BIGINT NOT NULL,
    batch         VARCHAR NOT NULL,
    ingested_at   TIMESTAMP DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS judgments (
    judge         VARCHAR NOT NULL,
    key           VARCHAR NOT NULL,         -- sha256 of instruction, response
    instruction   VARCHAR NOT NULL,
    response      VARCHAR NOT NULL,
    judgment      VARCHAR,                  -- NULL when status = 'failed'
    polarity      VARCHAR,                  -- 'positive' | 'negative' | NULL when failed
    status        VARCHAR NOT NULL,         -- 'ok' | 'failed'
    error         VARCHAR,
    attempts      INTEGER DEFAULT 1,
    judged_at     TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (judge, key)
);
CREATE TABLE IF NOT EXISTS generations (
    run           VARCHAR NOT NULL,         -- pipeline run key
    iteration     INTEGER NOT NULL,
    prompt_index  BIGINT NOT NULL,
    instruction   VARCHAR NOT NULL,
    response      VARCHAR NOT NULL,
    model_digest  VARCHAR NOT NULL,
    generated_at  TIMESTAMP DEFAULT current_timestamp,
    pipeline      VARCHAR,                  -- the pipeline's name, matched exactly by sample_prompts
    engine        VARCHAR,                  -- who generated: transformers | openai:URL[|model] | vllm
    PRIMARY KEY (run, iteration, prompt_index)
);
"""
# Columns added after the first release: a warehouse file created before gains them on open.
MIGRATIONS = """
ALTER TABLE triplets ADD COLUMN IF NOT EXISTS score DOUBLE;
ALTER TABLE triplets ADD COLUMN IF NOT EXISTS file_digest VARCHAR;
ALTER TABLE generations ADD COLUMN IF NOT EXISTS pipeline VARCHAR;
CREATE TABLE IF NOT EXISTS round_triplets (
    pipeline      VARCHAR NOT NULL,         -- the pipeline's name, matched exactly
    round         VARCHAR NOT NULL,         -- the round's run key (<name>-<digest>-<round label>)
    triplet_id    VARCHAR NOT NULL,         -- triplets.id
    selected_at   TIMESTAMP DEFAULT current_timestamp,
    version       INTEGER,                  -- the registered version trained on it; NULL until then
    PRIMARY KEY (round, triplet_id)
);
ALTER TABLE triplets ADD COLUMN IF NOT EXISTS context VARCHAR;
ALTER TABLE triplets ADD COLUMN IF NOT EXISTS element INTEGER;
ALTER TABLE rejects ADD COLUMN IF NOT EXISTS element INTEGER;
ALTER TABLE generations ADD COLUMN IF NOT EXISTS engine VARCHAR;
"""
# Rows ingested before triplets.file_digest existed get it from ingested_files (the file's path
# and batch name it); run once per open, it touches only rows still without a digest.
BACKFILL = """
UPDATE triplets AS t SET file_digest = f.digest
FROM ingested_files AS f
WHERE t.file_digest IS NULL AND t.source = f.path AND t.batch = f.batch
"""


class WarehouseBusy(RuntimeError):
    """Another process holds the warehouse for writing."""


def _key_bytes(parts) -> bytes:
    """The bytes content keys and triplet ids hash: each part as 0x01 + UTF-8 text (0x00 for
    None), then 0x1f. None and '' are distinct, and no part runs into its neighbour."""
    return b"".join((b"\x00" if p is None else b"\x01" + p.encode("utf-8")) + b"\x1f" for p in parts)


def content_key(*parts: str | None) -> str:
    """Stable sha256 over text parts (judgment cache keys, judge names); content_key_sql computes
    the same hex digest inside DuckDB (tests check they agree)."""
    return hashlib.sha256(_key_bytes(parts)).hexdigest()


# Triplet ids hash the same bytes with md5 (32 hex characters): ingest computes one per row,
# and DuckDB's md5 costs about half its sha256 (the bench's 1M rows: ~1.5 CPU-s less, and a
# narrower id column to compress and join). They are content addresses for dedupe, not a
# security boundary. Warehouses made with sha256 ids are migrated on open (migrate_triplet_ids).
TRIPLET_ID_HASH = "md5"


def triplet_id(instruction: str, response: str, judgment: str | None, context: str | None = None) -> str:
    """A triplet's id: md5 over (instruction, response, judgment), with the multi-turn prompt's
    stored turns (`context`, templates.context_json) as a fourth part only when there are any."""
    parts = (instruction, response, judgment) if context is None else (instruction, response, judgment, context)
    return hashlib.new(TRIPLET_ID_HASH, _key_bytes(parts), usedforsecurity=False).hexdigest()


def triplet_id_sql(instruction: str, response: str, judgment: str, context: str | None = None) -> str:
    """DuckDB expression equal to triplet_id of these SQL expressions' values."""
    flat = _key_sql(TRIPLET_ID_HASH, (instruction, response, judgment))
    if context is None:
        return flat
    return (f"CASE WHEN {context} IS NULL THEN {flat} "
            f"ELSE {_key_sql(TRIPLET_ID_HASH, (instruction, response, judgment, context))} END")


def content_key_sql(*parts: str) -> str:
    """DuckDB expression over SQL expressions `parts` equal to content_key of their values."""
    return _key_sql("sha256", parts)


def _key_sql(fn: str, parts) -> str:
    # concat() skips a NULL: the marker byte, then the text itself (no copy of marker || text)
    pieces = ", ".join(f"CASE WHEN {p} IS NULL THEN chr(0) ELSE chr(1) END, {p}, chr(31)" for p in parts)
    return f"{fn}(concat({pieces}))"


# ---------------------------------------------------------------- the triplet id migration

# warehouse_meta records what a file's stored values mean; 'triplet_ids' names the hash of
# triplets.id (absent: the sha256 of earlier releases).
META = """
CREATE TABLE IF NOT EXISTS warehouse_meta (
    key           VARCHAR PRIMARY KEY,
    value         VARCHAR NOT NULL
);
"""


def migrate_triplet_ids(con: duckdb.DuckDBPyConnection) -> int:
    """Rewrite a warehouse's sha256 triplet ids as TRIPLET_ID_HASH ids, in one transaction:
    triplets.id recomputed from each row's own columns, round_triplets.triplet_id mapped from
    old to new (a recurring round still knows what it trained on), then warehouse_meta records
    the hash, so this runs once per file. Returns the triplets rewritten (0 when already done)."""
    done = _relation_rows(con, "SELECT value FROM warehouse_meta WHERE key = 'triplet_ids'")
    if done and done[0][0] == TRIPLET_ID_HASH:
        return 0
    new_id = triplet_id_sql("instruction", "response", "judgment", "context")
    with transaction(con):
        n = _relation_rows(con, "SELECT count(*) FROM triplets")[0][0]
        if n:
            con.execute(f"CREATE OR REPLACE TEMP TABLE _id_map AS SELECT DISTINCT id AS old, {new_id} AS new "
                        "FROM triplets")
            con.execute("UPDATE round_triplets SET triplet_id = m.new FROM _id_map m "
                        "WHERE round_triplets.triplet_id = m.old")
            con.execute(f"UPDATE triplets SET id = {new_id}")
            con.execute("DROP TABLE _id_map")
        con.execute("INSERT OR REPLACE INTO warehouse_meta VALUES ('triplet_ids', $h)", {"h": TRIPLET_ID_HASH})
    return n


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """The block's statements on `con` commit together when it ends, or roll back together when
    it raises (any exception, KeyboardInterrupt included, is raised again)."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def connect(path: str | Path, *, read_only: bool = False, wait_s: float = 30.0) -> duckdb.DuckDBPyConnection:
    """Open the warehouse, creating the schema when writable.

    DuckDB allows one writer process per file. A second writer waits up to `wait_s` seconds
    for the lock and then raises `WarehouseBusy` with a message that names the file.
    """
    path = Path(path)
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as err:
            if "lock" not in str(err).lower():
                raise
            if time.monotonic() >= deadline:
                raise WarehouseBusy(
                    f"warehouse {path} is open for writing in another process; DuckDB allows one "
                    f"writer per file. Wait for that process to finish (waited {wait_s:.0f}s)."
                ) from None
            time.sleep(0.25)
    if not read_only:
        con.execute(SCHEMA)
        con.execute(MIGRATIONS)
        con.execute(META)
        con.execute(BACKFILL)
        migrate_moved_judge_names(con)
        migrate_triplet_ids(con)
    return con


def migrate_moved_judge_names(con: duckdb.DuckDBPyConnection) -> int:
    """Cached judgments of a FunctionJudge are stored under `<module>:<name>` (declared) or
    `function:<module>:<name>` (a function object); a module
    the layout moved (cut_core.compat.MOVED, e.g. cut_core.demo_task -> cut_core.tasks.arithmetic)
    gives the same judge a new name. Rename the stored rows (a judgment already stored under the
    new name wins), so a warehouse made before the move finds its cached judgments. Returns the
    rows renamed; one indexed-free scan of the judge names per open, nothing when none match."""
    from cut_core.compat import MOVED

    pattern = "^(function:)?(" + "|".join(re.escape(old) for old in MOVED) + "):"
    old_names = [r[0] for r in _relation_rows(
        con, "SELECT DISTINCT judge FROM judgments WHERE regexp_matches(judge, $p)", {"p": pattern})]
    renamed = 0
    for name in old_names:
        prefix = "function:" if name.startswith("function:") else ""
        module, _, rest = name[len(prefix):].partition(":")
        new = f"{prefix}{MOVED[module]}:{rest}"
        with transaction(con):
            con.execute("INSERT OR IGNORE INTO judgments SELECT * REPLACE ($new AS judge) FROM judgments "
                        "WHERE judge = $old", {"new": new, "old": name})
            renamed += _relation_rows(con, "SELECT count(*) FROM judgments WHERE judge = $old", {"old": name})[0][0]
            con.execute("DELETE FROM judgments WHERE judge = $old", {"old": name})
    return renamed



def _relation_rows(con: duckdb.DuckDBPyConnection, sql: str, params=None) -> list[tuple]:
    # A relation (con.sql), fetched whole: execute().fetch* leaves a DuckDB 2 connection busy.
    return con.sql(sql, params=params).fetchall()


class ArrowView:
    """An Arrow table that DuckDB reads through the Arrow C stream interface, once per scan.

    con.register() of a table inside a transaction keeps the table alive until the commit (the
    catalog keeps a dropped view, like a dropped temporary table, for the transaction), so a
    large file written in one transaction would keep every chunk in memory until the end.
    Registering this holder and setting `table` to None once the chunk is written leaves only
    the empty holder behind (see `arrow_view`)."""

    def __init__(self, table):
        self.table = table

    def __arrow_c_stream__(self, requested_schema=None):
        return self.table.__arrow_c_stream__(requested_schema)


def arrow_view(con: duckdb.DuckDBPyConnection, name: str, table) -> "contextlib.AbstractContextManager[ArrowView]":
    """Context manager: the Arrow `table` visible as `name` for the block, its memory freed at
    the end of the block even inside a transaction. Yields the ArrowView (assign `.table` to
    show another table under the same name)."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        view = ArrowView(table)
        con.register(name, view)
        try:
            yield view
        finally:
            con.unregister(name)
            view.table = None
    return cm()


def _registered(con: duckdb.DuckDBPyConnection, name: str, table):
    """Context manager: `table` (Arrow/polars/pandas) visible as `name` for the block."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        con.register(name, table)
        try:
            yield name
        finally:
            con.unregister(name)
    return cm()
