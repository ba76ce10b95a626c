"""Judgments, the label cache: what a judge has judged, storing results, and copying them onto
unlabeled triplets."""

from __future__ import annotations


import duckdb

from cut_core.data.warehouse.schema import _registered, _relation_rows

# ---------------------------------------------------------------- judgments (the label cache)

def judgment_status(con: duckdb.DuckDBPyConnection, judge: str, keys: list[str]) -> dict[str, str]:
    """key -> status ('ok' | 'failed') of the judgments `judge` already made for these keys."""
    import pyarrow as pa

    with _registered(con, "_wh_label_keys", pa.table({"key": keys})):
        found = _relation_rows(con, """
            SELECT j.key, j.status FROM judgments j JOIN _wh_label_keys k ON j.key = k.key
            WHERE j.judge = $judge""", {"judge": judge})
    return dict(found)


def store_judgments(con: duckdb.DuckDBPyConnection, judge: str, rows: list[dict]) -> None:
    """Insert (or replace) judgments: dicts of key, instruction, response, judgment, polarity,
    status, error, attempts. Replacing is safe: only keys without an OK judgment are ever judged,
    so this overwrites at most an earlier failure."""
    import pyarrow as pa

    columns = ("key", "instruction", "response", "judgment", "polarity", "status", "error")
    table = pa.table({"judge": [judge] * len(rows), **{c: [r[c] for r in rows] for c in columns},
                      "attempts": pa.array([r["attempts"] for r in rows], pa.int32())})
    with _registered(con, "_wh_label_batch", table):
        con.execute("""
            INSERT OR REPLACE INTO judgments
                (judge, key, instruction, response, judgment, polarity, status, error, attempts, judged_at)
            SELECT judge, key, instruction, response, judgment, polarity, status, error, attempts,
                   current_timestamp
            FROM _wh_label_batch""")


def unlabeled_triplets(con: duckdb.DuckDBPyConnection, *, sources=None, limit: int | None = None) -> list[tuple[str, str]]:
    """(instruction, response) of the triplets that await a judge (polarity NULL).

    sources: only triplets ingested from these files (the `source` column), when given.
    """
    sql, params = "SELECT DISTINCT instruction, response FROM triplets WHERE polarity IS NULL", {}
    if sources is not None:
        sql, params = sql + " AND list_contains($sources, source)", {"sources": list(sources)}
    sql += " ORDER BY instruction, response"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return [tuple(r) for r in _relation_rows(con, sql, params or None)]


def apply_judgments(con: duckdb.DuckDBPyConnection, judge: str) -> int:
    """Copy OK judgments of `judge` onto unlabeled triplets; returns how many were labeled.

    Joined on the text itself (the judgments table keeps instruction and response), so no hash has
    to be recomputed in SQL. A failed judgment matches nothing here: its triplet stays unlabeled
    (polarity NULL) and is not trained on until a later run judges it.
    """
    rows = con.execute("""
        UPDATE triplets AS t
        SET judgment = j.judgment, polarity = j.polarity
        FROM judgments AS j
        WHERE t.polarity IS NULL
          AND j.judge = ? AND j.status = 'ok'
          AND j.instruction = t.instruction AND j.response = t.response""", [judge]).fetchall()
    return int(rows[0][0]) if rows else 0
