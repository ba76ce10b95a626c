"""What each run used: the triplets of recurring offline rounds, and the generations (and instructions)
of online iterations."""

from __future__ import annotations


import duckdb

from cut_core.data.warehouse.schema import _registered, _relation_rows, transaction

# ---------------------------------------------------------------- recurring offline rounds

_SELECT_ROUND_SQL = """
INSERT INTO round_triplets (pipeline, round, triplet_id)
SELECT DISTINCT $pipeline, $round, t.id
FROM triplets t
WHERE t.polarity IS NOT NULL AND list_contains($digests, t.file_digest)
  AND t.id NOT IN (SELECT triplet_id FROM round_triplets
                   WHERE pipeline = $pipeline AND version IS NOT NULL AND round <> $round)
"""


def select_round(con: duckdb.DuckDBPyConnection, *, pipeline: str, round: str, digests: list[str]) -> dict:
    """Fix the triplets of one recurring round of `pipeline` (the name, matched exactly): the
    labeled triplets of the files with these ingest `digests` that no finished round of the
    pipeline trained on (a round is finished once round_trained recorded its version). An earlier
    selection of the same round, left by a crash before the caller stored it, is replaced.
    Returns {"triplets", "positives", "negatives"} of the selection."""
    with transaction(con):
        con.execute("DELETE FROM round_triplets WHERE round = $round", {"round": round})
        con.execute(_SELECT_ROUND_SQL, {"pipeline": pipeline, "round": round, "digests": list(digests)})
    ((n, positives, negatives),) = _relation_rows(con, """
        SELECT count(*), count(*) FILTER (WHERE t.polarity = 'positive'),
               count(*) FILTER (WHERE t.polarity = 'negative')
        FROM round_triplets r JOIN triplets t ON t.id = r.triplet_id
        WHERE r.round = $round""", {"round": round})
    return {"triplets": int(n), "positives": int(positives), "negatives": int(negatives)}


def round_trained(con: duckdb.DuckDBPyConnection, *, round: str, version: int) -> int:
    """Record that `round` trained registered `version` on its triplets (later rounds of the same
    pipeline skip them). Idempotent; returns how many triplets the round holds."""
    con.execute("UPDATE round_triplets SET version = $v WHERE round = $round", {"v": int(version), "round": round})
    return int(_relation_rows(con, "SELECT count(*) FROM round_triplets WHERE round = $round",
                              {"round": round})[0][0])


def round_triplet_ids(con: duckdb.DuckDBPyConnection, round: str) -> list[str]:
    """The ids of the triplets selected for `round`, sorted."""
    return [r[0] for r in _relation_rows(
        con, "SELECT triplet_id FROM round_triplets WHERE round = $round ORDER BY 1", {"round": round})]


# ---------------------------------------------------------------- generations (online iterations)

def used_instructions(con: duckdb.DuckDBPyConnection, pipeline: str) -> list[str]:
    """Every instruction any run of `pipeline` (the name, matched exactly) generated for."""
    return [r[0] for r in _relation_rows(
        con, "SELECT DISTINCT instruction FROM generations WHERE pipeline = $p", {"p": pipeline})]


def replace_generations(con: duckdb.DuckDBPyConnection, frame, *, run: str, iteration: int, model: str,
                        pipeline: str | None, engine: str | None = "transformers") -> None:
    """Store one iteration's generations (frame: prompt_index, instruction, response), replacing
    what an earlier attempt of the same run and iteration stored; `engine` names who generated
    (cut_core.infer.engines.engine_name)."""
    with _registered(con, "_wh_generations", frame), transaction(con):
        con.execute("DELETE FROM generations WHERE run = ? AND iteration = ?", [run, iteration])
        con.execute("INSERT INTO generations (run, iteration, prompt_index, instruction, response, model_digest, "
                    "pipeline, engine) SELECT ?, ?, prompt_index, instruction, response, ?, ?, ? FROM _wh_generations",
                    [run, iteration, model, pipeline, engine])


def judgments_of(con: duckdb.DuckDBPyConnection, judge: str, pairs):
    """The stored judgments of `judge` for (prompt_index, instruction, response) rows, in
    prompt_index order; a pair never judged has NULL judgment, polarity, status and error."""
    with _registered(con, "_wh_pairs", pairs):
        return con.sql("""
            SELECT g.prompt_index, g.instruction, g.response, j.judgment, j.polarity, j.status, j.error
            FROM _wh_pairs g LEFT JOIN judgments j
              ON j.judge = $judge AND j.instruction = g.instruction AND j.response = g.response
            ORDER BY g.prompt_index""", params={"judge": judge}).pl()
