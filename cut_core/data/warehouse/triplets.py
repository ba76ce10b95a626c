"""Triplets: the one insert path (`add_checked`: dedupe by content id, bad rows and duplicates to rejects),
online judgments through it, ingested files, and reading triplets back."""

from __future__ import annotations


import duckdb

from cut_core.data.warehouse.schema import _registered, _relation_rows, arrow_view, transaction, triplet_id_sql

# ---------------------------------------------------------------- triplets: the one insert path

# `checked` is a table with one row per unit: unit (unique in the table), row_number, element
# (the array element of an exploded row, else NULL), reason (NULL: a good row), detail, raw, id,
# instruction, context, response, judgment, polarity, refined, score, contradiction
# (cut_core.data.ingest.sql.validation_sql builds it from files, triplets_from_judged from judged
# generations). Duplicates of a good row: a triplet already stored (an earlier file, batch or
# chunk of this file, all visible inside the caller's transaction), else an earlier good row of
# this table. triplets.id has no index (maintaining one on random 64-character keys cost as much
# as the compressed insert itself), so both lookups are hash joins; one writer per warehouse
# file (connect) means nothing can slip in between the lookup and the insert.
_DUPS_SQL = """
WITH good AS (SELECT unit, row_number, element, id FROM {checked} WHERE reason IS NULL),
stored AS (
    -- without a unique constraint another writer may have stored an id twice: name the first
    SELECT t.id, min({{'source': t.source, 'row_number': t.row_number, 'element': t.element}}) AS first
    FROM triplets t SEMI JOIN good g ON t.id = g.id
    GROUP BY t.id
),
repeats AS (SELECT id, min(unit) AS first_unit FROM good GROUP BY id HAVING count(*) > 1)
SELECT g.unit, g.id, s.first.source AS first_source, s.first.row_number AS first_row,
       s.first.element AS first_element
FROM good g JOIN stored s ON g.id = s.id
UNION ALL
SELECT g.unit, g.id, $source, f.row_number, f.element
FROM good g JOIN repeats r ON g.id = r.id JOIN good f ON f.unit = r.first_unit
WHERE g.unit <> r.first_unit AND g.id NOT IN (SELECT id FROM stored)
"""

_COUNT_SQL = """
SELECT CASE WHEN d.unit IS NOT NULL THEN 'duplicate' ELSE c.reason END AS reason,
       c.polarity, c.contradiction, count(*) AS n
FROM {checked} c LEFT JOIN _wh_dups d ON c.unit = d.unit
GROUP BY ALL
"""

_INSERT_TRIPLETS_SQL = """
INSERT INTO triplets (id, instruction, response, judgment, polarity, refined, score, contradiction, batch, source,
                      row_number, file_digest, context, element)
SELECT id, instruction, response, judgment, polarity, refined, score, contradiction, $batch, $source, row_number,
       $digest, context, element
FROM {checked} c ANTI JOIN _wh_dups d USING (unit)
WHERE c.reason IS NULL
"""

_INSERT_REJECTS_SQL = """
INSERT INTO rejects (source, row_number, element, raw, reason, detail, batch)
SELECT $source, row_number, element, raw, reason, detail, $batch FROM (
    SELECT row_number, element, raw, reason, detail FROM {checked}
    WHERE reason IS NOT NULL AND reason <> 'blank'
    UNION ALL
    SELECT c.row_number, c.element, {dup_raw}, 'duplicate',
           'same triplet (id ' || left(d.id, 12) || ') as ' || d.first_source || ' row ' || d.first_row
           || COALESCE(' element ' || d.first_element, '')
    FROM _wh_dups d JOIN {checked} c USING (unit) {lines_join}
) ORDER BY row_number, element
"""


def add_checked(con: duckdb.DuckDBPyConnection, checked: str, *, source: str, batch: str,
                digest: str | None = None, lines: str | None = None
                ) -> list[tuple[str | None, str | None, bool | None, int]]:
    """Write a checked table (see above) into the warehouse: good rows that are not duplicates
    into `triplets`, bad rows and duplicates into `rejects` (with their raw text and why).

    The caller owns the transaction. Returns (reason, polarity, contradiction, n) counts, where
    reason is None for rows written to triplets, 'duplicate' for duplicates and 'blank' for
    blank lines (counted, not stored). `lines`: a table (row_number, text) the duplicates' raw
    text is taken from (line terminator stripped) when `checked` keeps raw for rejects only.
    """
    dup_raw, lines_join = "c.raw", ""
    if lines is not None:
        # pre_raw: the record as read when the reader rewrote it (a `messages` row)
        dup_raw = "COALESCE(c.raw, l.pre_raw, rtrim(l.text, chr(13) || chr(10)))"
        lines_join = f"LEFT JOIN {lines} l ON l.row_number = c.row_number"
    params = {"source": source}
    # the duplicates as an Arrow view, not a temporary table: a table dropped inside the caller's
    # transaction would stay in memory until its commit (see schema.ArrowView)
    dups = con.sql(_DUPS_SQL.format(checked=checked), params=params).to_arrow_table()
    with arrow_view(con, "_wh_dups", dups):
        del dups
        counts = _relation_rows(con, _COUNT_SQL.format(checked=checked))
        con.execute(_INSERT_TRIPLETS_SQL.format(checked=checked), {**params, "batch": batch, "digest": digest})
        con.execute(_INSERT_REJECTS_SQL.format(checked=checked, dup_raw=dup_raw, lines_join=lines_join),
                    {**params, "batch": batch})
    return counts


def add_judged(con: duckdb.DuckDBPyConnection, judged, *, source: str, batch: str) -> int:
    """Judged generations -> triplets through add_checked (the same ids and duplicate rule as
    file ingest). `judged`: a frame with prompt_index, instruction, response, judgment,
    polarity (both NULL where the judge failed: the triplet is stored unlabeled).
    Returns the number of triplets added; commits in its own transaction."""
    with transaction(con):
        return _add_judged(con, judged, source=source, batch=batch)


def _add_judged(con: duckdb.DuckDBPyConnection, judged, *, source: str, batch: str) -> int:
    with _registered(con, "_wh_judged", judged):
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE _wh_checked AS
            SELECT prompt_index AS unit, prompt_index AS row_number, NULL::INTEGER AS element,
                   NULL::VARCHAR AS reason, NULL::VARCHAR AS detail, NULL::VARCHAR AS context,
                   to_json({{'instruction': instruction, 'response': response, 'judgment': judgment}})::VARCHAR AS raw,
                   {triplet_id_sql("instruction", "response", "judgment")} AS id,
                   instruction, response, judgment, polarity, NULL::VARCHAR AS refined, NULL::DOUBLE AS score,
                   false AS contradiction
            FROM _wh_judged""")
    try:
        counts = add_checked(con, "_wh_checked", source=source, batch=batch)
    finally:
        con.execute("DROP TABLE IF EXISTS _wh_checked")
    return sum(n for reason, _, _, n in counts if reason is None)


# ---------------------------------------------------------------- ingested files

def ingested_file(con: duckdb.DuckDBPyConnection, digest: str) -> dict | None:
    """What was recorded when the file with this digest was ingested, or None."""
    rows = _relation_rows(con, "SELECT path, rows_read, accepted, rejected, batch FROM ingested_files "
                               "WHERE digest = $d", {"d": digest})
    if not rows:
        return None
    path, rows_read, accepted, rejected, batch = rows[0]
    return {"path": path, "rows_read": rows_read, "accepted": accepted, "rejected": rejected, "batch": batch}


def record_ingested_file(con: duckdb.DuckDBPyConnection, *, digest: str, path: str, rows_read: int,
                         accepted: int, rejected: int, batch: str) -> None:
    con.execute("INSERT INTO ingested_files (digest, path, rows_read, accepted, rejected, batch) "
                "VALUES (?, ?, ?, ?, ?, ?)", [digest, path, rows_read, accepted, rejected, batch])


# ---------------------------------------------------------------- reading triplets

_TRIPLETS_SQL = """
SELECT id, instruction, response, judgment, polarity, refined, score, context
FROM triplets
WHERE polarity IS NOT NULL {filters}
ORDER BY id
"""


def labeled_triplets(con: duckdb.DuckDBPyConnection, *, batch: str | None = None,
                     digests: list[str] | None = None, sources: list[str] | None = None,
                     round: str | None = None):
    """The labeled triplets (polarity set) as a polars frame ordered by id: of one `batch`, of the
    files with these ingest `digests`, ingested from these `sources` (paths), and/or selected for
    one recurring `round` (select_round)."""
    filters, params = "", {}
    if round is not None:
        filters, params["round"] = (filters + " AND id IN (SELECT triplet_id FROM round_triplets "
                                    "WHERE round = $round)"), round
    if batch is not None:
        filters, params["batch"] = filters + " AND batch = $batch", batch
    if digests is not None:
        filters, params["digests"] = filters + " AND list_contains($digests, file_digest)", list(digests)
    if sources is not None:
        filters, params["sources"] = filters + " AND list_contains($sources, source)", list(sources)
    return con.sql(_TRIPLETS_SQL.format(filters=filters), params=params or None).pl()


def triplet_sources(con: duckdb.DuckDBPyConnection, digests: list[str]) -> list[str]:
    """The source paths of the triplets ingested from files with these digests."""
    return [r[0] for r in _relation_rows(
        con, "SELECT DISTINCT source FROM triplets WHERE list_contains($d, file_digest) ORDER BY 1",
        {"d": list(digests)})]
