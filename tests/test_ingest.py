"""Ingestion into a real DuckDB warehouse, on the real cut-online and Shepherd data.

Proves: the cut-online file ingests to the documented counts (1000 read, 47 failed judge calls
rejected, 713 positives + 240 negatives, 17 contradictions reported or quarantined) with ids equal
to warehouse.triplet_id; a second ingest adds nothing; Shepherd's own column names map through
Source.columns; `input` is appended to the instruction; JSONL, JSON array, Parquet and CSV
files and a glob of several ingest in one run with exact row numbers; duplicates across files
(Parquet and CSV duplicates keep their raw record; an id another writer stored twice gives one
reject), unlabeled and score-labeled sources; re-ingesting a large file stops its validation; the reject-rate gate raises with its counts after
committing; a second writer process waits or gets WarehouseBusy; the Prefect flow returns the
report and publishes its table artifact.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cut_core.data import warehouse as wh
from cut_core.dsl import Polarity, Source
from cut_core.data.ingest import IngestError, RejectRateExceeded, ingest_files, ingest_sources

SHEPHERD_COLUMNS = {"instruction": "question", "response": "answer", "judgment": "feedback"}


@pytest.fixture
def con(tmp_path):
    c = wh.connect(tmp_path / "warehouse.duckdb")
    yield c
    c.close()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def triplets(con, where: str = "true") -> list[tuple]:
    return con.sql(f"SELECT id, instruction, response, judgment, polarity, contradiction, source, row_number "
                   f"FROM triplets WHERE {where} ORDER BY source, row_number").fetchall()


def rejects(con) -> list[tuple]:
    return con.sql("SELECT source, row_number, reason, raw, detail FROM rejects ORDER BY source, row_number").fetchall()


# ---------------------------------------------------------------- the real data

def test_cut_online_iter1_counts_ids_and_rerun(con, shared_data):
    path = shared_data / "cut-online" / "iter1.json"
    report = ingest_files(con, Source(paths=[str(path)]), batch="b1")
    assert (report.rows_read, report.accepted, report.rejected) == (1000, 953, 47)
    assert report.rejected_by_reason == {"failed_judgment": 47}
    assert (report.positives, report.negatives, report.unlabeled) == (713, 240, 0)

    # Contradictions: accepted, flagged, and exactly the negatives whose text says "perfect".
    assert report.contradictions == 17
    flagged = con.sql("SELECT judgment FROM triplets WHERE contradiction").fetchall()
    assert len(flagged) == 17 and all(j.startswith("The response is perfect") for (j,) in flagged)
    assert con.sql("SELECT count(*) FROM triplets WHERE polarity = 'negative' AND NOT contradiction "
                   "AND judgment ILIKE 'The response is perfect%'").fetchall() == [(0,)]

    rows = triplets(con)
    assert len(rows) == 953
    assert all(tid == wh.triplet_id(ins, resp, j) for tid, ins, resp, j, *_ in rows)
    assert all(j is None for _, _, _, j, pol, *_ in rows if pol == "positive")

    # Rejects name the record (1-based index in the array), keep its raw text, say why.
    bad = rejects(con)
    records = json.loads(path.read_text())
    assert [r[1] for r in bad] == [i + 1 for i, rec in enumerate(records) if rec["judgment"] == "$ERROR$"]
    assert all(r[2] == "failed_judgment" and "$ERROR$" in r[4] and json.loads(r[3])["id"] == r[1] - 1 for r in bad)

    again = ingest_files(con, Source(paths=[str(path)]), batch="b2")
    assert again.skipped_files == [str(path)] and again.rows_read == 0 and again.accepted == 0
    assert triplets(con) == rows
    assert con.sql("SELECT count(*) FROM rejects").fetchall() == [(47,)]


def test_quarantined_contradictions_become_rejects(con, shared_data):
    source = Source(paths=[str(shared_data / "cut-online" / "iter1.json")],
                    polarity=Polarity(quarantine_contradictions=True))
    report = ingest_files(con, source, batch="q")
    assert report.rejected_by_reason == {"contradiction": 17, "failed_judgment": 47}
    assert (report.accepted, report.positives, report.negatives, report.contradictions) == (936, 713, 223, 0)


def test_shepherd_columns_are_mapped(con, shared_data):
    source = Source(paths=[str(shared_data / "shepherd" / "human_data_for_model.jsonl")], columns=SHEPHERD_COLUMNS)
    report = ingest_files(con, source, batch="s")
    assert (report.rows_read, report.accepted, report.negatives, report.rejected) == (1317, 1317, 1317, 0)
    first = json.loads((shared_data / "shepherd" / "human_data_for_model.jsonl").open().readline())
    assert triplets(con, "row_number = 1")[0][1:4] == (first["question"], first["answer"], first["feedback"])


# ---------------------------------------------------------------- fields and polarity

def test_input_is_appended_after_one_newline(con, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Translate", "input": "bonjour", "output": "hello", "judgment": None},
        {"instruction": "Say hi", "input": "", "response": "hi", "judgment": "perfect."},
        {"instruction": "Add", "input": "  ", "output": "4", "judgment": "Wrong: 2+2 is 4, but the format is off"},
    ])
    ingest_files(con, Source(paths=[str(path)]), batch="i")
    got = [(r[1], r[2], r[4]) for r in triplets(con)]
    assert got == [("Translate\nbonjour", "hello", "positive"), ("Say hi", "hi", "positive"),
                   ("Add", "4", "negative")]


def test_unlabeled_sources_and_missing_judgment_column(con, tmp_path):
    no_judgment = write_jsonl(tmp_path / "plain.jsonl", [{"instruction": "q1", "output": "a1"}])
    with_judgment = write_jsonl(tmp_path / "judged.jsonl", [{"instruction": "q2", "output": "a2", "judgment": "bad"}])
    r1 = ingest_files(con, Source(paths=[str(no_judgment)]), batch="u")
    r2 = ingest_files(con, Source(paths=[str(with_judgment)], labeled=False), batch="u")
    assert (r1.unlabeled, r2.unlabeled, r1.positives + r2.positives + r1.negatives + r2.negatives) == (1, 1, 0)
    assert [(r[3], r[4]) for r in triplets(con)] == [(None, None), (None, None)]


def test_score_column_decides_polarity(con, tmp_path):
    path = write_jsonl(tmp_path / "scored.jsonl", [
        {"instruction": "q1", "output": "a1", "judgment": "too terse", "rating": 9},
        {"instruction": "q2", "output": "a2", "judgment": "too terse", "rating": 2},
        {"instruction": "q3", "output": "a3", "judgment": "fine", "rating": "8.5"},
        {"instruction": "q4", "output": "a4", "judgment": "fine", "rating": [1]},
    ])
    source = Source(paths=[str(path)], polarity=Polarity(score_column="rating", score_threshold=7))
    report = ingest_files(con, source, batch="s")
    assert [r[4] for r in triplets(con)] == ["positive", "negative", "positive"]
    # The score itself is kept: DPO builds its preference pairs from it.
    assert con.sql("SELECT score FROM triplets ORDER BY row_number").fetchall() == [(9.0,), (2.0,), (8.5,)]
    assert report.rejected_by_reason == {"wrong_type": 1}
    assert "rating is an array, expected a number" in rejects(con)[0][4]


# ---------------------------------------------------------------- formats, globs, duplicates

def test_jsonl_json_parquet_csv_and_a_glob_in_one_run(con, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [{"instruction": "j1", "output": "r1", "judgment": None}, "{oops",
                                   {"instruction": "j2", "output": "r2", "judgment": "Wrong."}])
    (data / "b.json").write_text(json.dumps([{"instruction": "a1", "output": "r1", "judgment": "Perfect"},
                                             ["not", "an", "object"]]))
    pq.write_table(pa.table({"instruction": ["p1", "p2"], "response": ["r1", ""], "judgment": [None, "Bad."]}),
                   data / "c.parquet")
    (data / "d.csv").write_text('instruction,output,judgment\nc1,r1,\n"multi\nline",r2,Too long\nonly,two\nc3,r3,perfect\n')
    report = ingest_files(con, Source(paths=[str(data / "*")]), batch="g")

    by_file = {Path(f.path).name: (f.format, f.rows_read, f.accepted, f.rejected_by_reason) for f in report.files}
    assert by_file == {
        "a.jsonl": ("jsonl", 3, 2, {"malformed_json": 1}),
        "b.json": ("json", 2, 1, {"not_an_object": 1}),
        "c.parquet": ("parquet", 2, 1, {"missing_response": 1}),
        "d.csv": ("csv", 4, 3, {"malformed_csv": 1}),
    }
    got = {(Path(s).name, n, ins, pol) for _, ins, _, _, pol, _, s, n in triplets(con)}
    assert got == {("a.jsonl", 1, "j1", "positive"), ("a.jsonl", 3, "j2", "negative"),
                   ("b.json", 1, "a1", "positive"), ("c.parquet", 1, "p1", "positive"),
                   ("d.csv", 1, "c1", "positive"), ("d.csv", 2, "multi\nline", "negative"),
                   ("d.csv", 4, "c3", "positive")}
    bad = {(Path(s).name, n, reason) for s, n, reason, _, _ in rejects(con)}
    assert bad == {("a.jsonl", 2, "malformed_json"), ("b.json", 2, "not_an_object"),
                   ("c.parquet", 2, "missing_response"), ("d.csv", 3, "malformed_csv")}
    assert all(raw for *_, raw, _ in rejects(con))


def test_duplicates_within_and_across_files(con, tmp_path):
    rec = {"instruction": "q", "output": "a", "judgment": "Wrong."}
    first = write_jsonl(tmp_path / "first.jsonl", [rec, {"instruction": "q2", "output": "a2"}, rec])
    second = write_jsonl(tmp_path / "second.jsonl", [{**rec, "id": 7}, {"instruction": "q3", "output": "a3"}])
    report = ingest_files(con, Source(paths=[str(first), str(second)]), batch="d")
    assert (report.accepted, report.rejected_by_reason) == (3, {"duplicate": 2})
    dups = [(Path(s).name, n, detail) for s, n, reason, _, detail in rejects(con)]
    assert dups[0][:2] == ("first.jsonl", 3) and dups[0][2].endswith(f"{first} row 1")
    assert dups[1][:2] == ("second.jsonl", 1) and dups[1][2].endswith(f"{first} row 1")


def test_duplicates_in_parquet_and_csv_keep_their_raw_record(con, tmp_path):
    pq.write_table(pa.table({"instruction": ["p", "p"], "response": ["r", "r"]}), tmp_path / "a.parquet")
    (tmp_path / "b.csv").write_text("instruction,output\nc,r\nc,r\n")
    report = ingest_files(con, Source(paths=[str(tmp_path / "a.parquet"), str(tmp_path / "b.csv")]), batch="d")
    assert (report.accepted, report.rejected_by_reason) == (2, {"duplicate": 2})
    raws = [json.loads(raw) for _, _, _, raw, _ in rejects(con)]
    assert raws == [{"instruction": "p", "response": "r"}, {"instruction": "c", "output": "r"}]


def test_duplicate_of_an_id_stored_twice_is_one_reject(con, tmp_path):
    """triplets.id has no unique index; another writer may have stored an id twice."""
    key = wh.triplet_id("q", "a", None)
    for row in (5, 6):
        con.execute("INSERT INTO triplets (id, instruction, response, batch, source, row_number) "
                    "VALUES (?, 'q', 'a', 'x', 'gen.parquet', ?)", [key, row])
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q2", "output": "a"}])
    report = ingest_files(con, Source(paths=[str(path)]), batch="d")
    assert (report.accepted, report.rejected_by_reason) == (1, {"duplicate": 1})
    assert [(n, reason, detail) for _, n, reason, _, detail in rejects(con)] == [
        (1, "duplicate", f"same triplet (id {key[:12]}) as gen.parquet row 5")]


def test_skipping_a_large_file_stops_its_validation(con, tmp_path, monkeypatch):
    """The worker starts validating while the file is hashed; a file already ingested stops it."""
    from cut_core.data.ingest import jsonl
    monkeypatch.setattr(jsonl, "CHUNK_BYTES", 1 << 16)
    path = write_jsonl(tmp_path / "big.jsonl", [{"instruction": f"q{i}", "output": "a" * 200} for i in range(5000)])
    assert ingest_files(con, Source(paths=[str(path)]), batch="b1").accepted == 5000
    again = ingest_files(con, Source(paths=[str(path)]), batch="b2")
    assert again.skipped_files == [str(path)] and again.rows_read == 0
    assert con.sql("SELECT count(*), count(DISTINCT id) FROM triplets").fetchall() == [(5000, 5000)]


def test_unreadable_sources_are_errors_not_empty_runs(con, tmp_path):
    with pytest.raises(IngestError, match="no file matches"):
        ingest_files(con, Source(paths=[str(tmp_path / "nothing-*.jsonl")]))
    with pytest.raises(IngestError, match="cannot tell the format"):
        ingest_files(con, Source(paths=[str(write_jsonl(tmp_path / "x.txt", []))]))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "q", "output": "a"}, {"instr')
    report = ingest_files(con, Source(paths=[str(broken)]))
    assert report.rejected_by_reason == {"malformed_json": 1}
    assert "not a valid JSON array" in rejects(con)[0][4]


# ---------------------------------------------------------------- the reject-rate gate

def test_reject_rate_gate_commits_then_raises_and_stays_failed(con, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q", "output": "a"}, "nope", "[]", "{}"])
    with pytest.raises(RejectRateExceeded) as caught:
        ingest_files(con, Source(paths=[str(path)]), max_reject_rate=0.5, batch="gate")
    err = caught.value
    assert (err.report["rows_read"], err.report["accepted"], err.report["rejected"]) == (4, 1, 3)
    assert err.report["rejected_by_reason"] == {"malformed_json": 1, "missing_instruction": 1, "not_an_object": 1}
    assert "3 of 4 rows" in str(err) and "batch = 'gate'" in str(err)
    assert con.sql("SELECT count(*) FROM triplets").fetchall() == [(1,)]
    assert con.sql("SELECT count(*) FROM rejects").fetchall() == [(3,)]
    # The same file again: nothing new is read, and the gate still judges its recorded counts.
    with pytest.raises(RejectRateExceeded):
        ingest_files(con, Source(paths=[str(path)]), max_reject_rate=0.5)
    assert ingest_files(con, Source(paths=[str(path)]), max_reject_rate=0.8).skipped_files == [str(path)]


# ---------------------------------------------------------------- one writer at a time

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from cut_core.data import warehouse
con = warehouse.connect({db!r})
print("holding", flush=True)
time.sleep({seconds})
con.close()
"""


def test_second_writer_waits_or_gets_warehouse_busy(tmp_path):
    db = tmp_path / "w.duckdb"
    wh.connect(db).close()
    root = str(Path(__file__).resolve().parents[1])
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=root, db=str(db), seconds=2)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(wh.WarehouseBusy, match="one writer"):
            wh.connect(db, wait_s=0.5)
        start = time.monotonic()
        con = wh.connect(db, wait_s=60)     # waits for the holder to finish, then opens
        assert time.monotonic() - start > 0.5
        report = ingest_sources(con, [Source(paths=[str(write_jsonl(tmp_path / "x.jsonl",
                                                                  [{"instruction": "q", "output": "a"}]))])])
        assert report.accepted == 1
        con.close()
    finally:
        holder.wait(timeout=60)


# ---------------------------------------------------------------- the Prefect flow

def test_ingest_flow_reports_and_publishes_its_table(prefect_harness, shared_data, tmp_path):
    from prefect.artifacts import Artifact

    from flows.ingest import ingest_flow, run_ingest

    sources = [Source(paths=[str(shared_data / "cut-online" / "iter1.json")]).model_dump(mode="json"),
               Source(paths=[str(shared_data / "shepherd" / "*.jsonl")], columns=SHEPHERD_COLUMNS).model_dump(mode="json")]
    warehouse = str(tmp_path / "wh.duckdb")
    report = ingest_flow(sources=sources, warehouse=warehouse, max_reject_rate=0.1, batch="flow-test")
    assert (report["rows_read"], report["accepted"], report["rejected"]) == (2317, 2270, 47)
    assert report["rejected_by_reason"] == {"failed_judgment": 47}
    assert (report["positives"], report["negatives"], report["unlabeled"], report["contradictions"]) == (713, 1557, 0, 17)
    assert report["skipped_files"] == []

    artifact = Artifact.get("ingest-report")
    assert artifact is not None and artifact.type == "table"
    table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert table[-1]["file"] == "TOTAL" and table[-1]["accepted"] == 2270 and table[-1]["failed_judgment"] == 47

    # The CLI's entry point, without Prefect: everything is already there, so it only skips.
    again = run_ingest([str(shared_data / "cut-online" / "iter1.json")], warehouse, {}, 0.1, use_prefect=False)
    assert again["rows_read"] == 0 and len(again["skipped_files"]) == 1


def test_a_warehouse_from_before_scores_gains_the_column(tmp_path):
    """Files written by an earlier release open, keep their rows, and can then store scores."""
    old = duckdb.connect(str(tmp_path / "old.duckdb"))
    old.execute("CREATE TABLE triplets (id VARCHAR NOT NULL, instruction VARCHAR NOT NULL, response VARCHAR NOT NULL,"
                " judgment VARCHAR, polarity VARCHAR, refined VARCHAR, contradiction BOOLEAN DEFAULT FALSE,"
                " batch VARCHAR NOT NULL, source VARCHAR NOT NULL, row_number BIGINT NOT NULL,"
                " ingested_at TIMESTAMP DEFAULT current_timestamp)")
    old.execute("INSERT INTO triplets (id, instruction, response, polarity, batch, source, row_number)"
                " VALUES ('x', 'q', 'a', 'positive', 'b', 's', 1)")
    old.close()
    con = wh.connect(tmp_path / "old.duckdb")
    path = write_jsonl(tmp_path / "scored.jsonl", [{"instruction": "q2", "output": "a2", "judgment": "ok", "rating": 3}])
    ingest_files(con, Source(paths=[str(path)], polarity=Polarity(score_column="rating", score_threshold=5)), batch="n")
    # the old row keeps its content; its id is rewritten as the triplet id of that content
    assert con.sql("SELECT id, score FROM triplets WHERE instruction = 'q'").fetchall() == [
        (wh.triplet_id("q", "a", None), None)]
    assert con.sql("SELECT score FROM triplets WHERE instruction = 'q2'").fetchall() == [(3.0,)]


def test_sha256_ids_of_an_earlier_release_become_md5_ids_once(tmp_path):
    """A warehouse whose triplets carry the sha256 ids of earlier releases is rewritten on open,
    once: every id becomes the md5 triplet id of the row's content (a multi-turn row's context
    included), a recurring round's record follows its triplets, and ingesting the same content
    again is a duplicate of the migrated row."""
    con = wh.connect(tmp_path / "w.duckdb")
    turns = '[{"role": "user", "content": "hi"}]'
    old = {("q", "a", "Bad.", None): wh.content_key("q", "a", "Bad."),
           ("q2", "a2", None, turns): wh.content_key("q2", "a2", None, turns)}
    for row, ((ins, resp, judgment, context), key) in enumerate(old.items(), start=1):
        con.execute("INSERT INTO triplets (id, instruction, response, judgment, polarity, batch, source, row_number, "
                    "context) VALUES (?, ?, ?, ?, 'negative', 'b', 's', ?, ?)", [key, ins, resp, judgment, row, context])
    con.execute("INSERT INTO round_triplets (pipeline, round, triplet_id) VALUES ('p', 'r1', ?)",
                [old[("q", "a", "Bad.", None)]])
    con.execute("DELETE FROM warehouse_meta")      # as a file written before warehouse_meta existed
    con.close()

    con = wh.connect(tmp_path / "w.duckdb")
    ids = dict(con.sql("SELECT instruction, id FROM triplets").fetchall())
    assert ids == {"q": wh.triplet_id("q", "a", "Bad."), "q2": wh.triplet_id("q2", "a2", None, turns)}
    assert con.sql("SELECT triplet_id FROM round_triplets").fetchall() == [(ids["q"],)]
    assert wh.migrate_triplet_ids(con) == 0          # recorded: not run again
    path = write_jsonl(tmp_path / "again.jsonl", [{"instruction": "q", "response": "a", "judgment": "Bad."}])
    assert ingest_files(con, Source(paths=[str(path)]), batch="n").rejected_by_reason == {"duplicate": 1}
