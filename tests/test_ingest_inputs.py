"""The inputs a new user actually has, ingested into a real DuckDB warehouse.

Proves: a path with [ * ? in its name is read literally (it ingests its own rows, not a glob
match); CSV is read in one explicit dialect (an odd quote does not switch how the other records
are read; the delimiter comes from the extension or the declaration); BOM-marked UTF-16/32
files are decoded, and a line that is not valid in that encoding is rejected naming it; Parquet
BINARY columns are decoded as UTF-8 or rejected as wrong_type; a record above the maximum size
is rejected with its reason (and a 64 MB line does not take 64 MB of memory); one polarity rule
for ingest and judges ('"Perfect."' in quotes is positive for both); judged generations take
the same insert path as files (same ids, duplicates rejected); generations are matched by exact
pipeline name; triplets are found by the digest of the file that brought them (nested globs,
a file already ingested under another name, a warehouse written before the digest column);
`cut-align ingest` on a missing file is one line and no traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cut_core.data import warehouse as wh
from cut_core.dsl import Source
from cut_core.data.ingest import ingest_files
from cut_core.judge import FunctionJudge
from cut_core.data.polarity import polarity_of, positive_sql

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def con(tmp_path):
    c = wh.connect(tmp_path / "warehouse.duckdb")
    yield c
    c.close()


def rows(con, where: str = "true") -> list[tuple]:
    return con.sql(f"SELECT row_number, instruction, response, judgment, polarity FROM triplets WHERE {where} "
                   "ORDER BY source, row_number").fetchall()


def rejects(con) -> list[tuple]:
    return con.sql("SELECT row_number, reason, detail, raw FROM rejects ORDER BY source, row_number").fetchall()


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# ---------------------------------------------------------------- literal paths

def test_paths_with_glob_characters_are_read_literally(con, tmp_path):
    pq.write_table(pa.table({"instruction": ["from a1"], "response": ["r"]}), tmp_path / "a1.parquet")
    pq.write_table(pa.table({"instruction": ["from a[12]", "second"], "response": ["r", "r"]}),
                   tmp_path / "a[12].parquet")
    (tmp_path / "b*.jsonl").write_text(jsonl([{"instruction": "star", "output": "r"}]))
    (tmp_path / "bx.jsonl").write_text(jsonl([{"instruction": "WRONG", "output": "r"}]))
    (tmp_path / "c?.csv").write_text("instruction,output\nquestion,r\n")
    (tmp_path / "cx.csv").write_text("instruction,output\nWRONG,r\n")
    report = ingest_files(con, Source(paths=[str(tmp_path / "a[12].parquet"), str(tmp_path / "b*.jsonl"),
                                             str(tmp_path / "c?.csv")]), batch="lit")
    assert [Path(f.path).name for f in report.files] == ["a[12].parquet", "b*.jsonl", "c?.csv"]
    assert sorted(r[1] for r in rows(con)) == ["from a[12]", "question", "second", "star"]
    assert report.rejected == 0
    # A pattern that is not a file is still a glob.
    again = ingest_files(con, Source(paths=[str(tmp_path / "a?.parquet")]), batch="glob")
    assert [Path(f.path).name for f in again.files] == ["a1.parquet"] and again.accepted == 1


# ---------------------------------------------------------------- CSV dialect

def test_csv_dialect_is_explicit_not_sniffed(con, tmp_path):
    # One record with a stray quote inside an unquoted field: every quoted record around it is
    # still read with RFC 4180 quoting (no literal quote characters, commas inside quotes kept).
    (tmp_path / "odd.csv").write_text('instruction,output,judgment\n"q1, with comma","a1",Perfect\n'
                                      'q2,a"2,bad\n"q3","a ""quoted"" word","Wrong, see"\n')
    (tmp_path / "t.tsv").write_text("instruction\toutput\nq4, with comma\ta4\n")
    (tmp_path / "semi.txt").write_text("instruction;output\nq5;a5\n")
    report = ingest_files(con, Source(paths=[str(tmp_path / "odd.csv"), str(tmp_path / "t.tsv")]), batch="csv")
    semi = ingest_files(con, Source(paths=[str(tmp_path / "semi.txt")], format="csv", delimiter=";"), batch="csv")
    assert report.rejected == 0 and semi.accepted == 1
    assert [(r[1], r[2], r[3]) for r in rows(con)] == [
        ("q1, with comma", "a1", "Perfect"), ("q2", 'a"2', "bad"), ("q3", 'a "quoted" word', "Wrong, see"),
        ("q5", "a5", None), ("q4, with comma", "a4", None)]


# ---------------------------------------------------------------- encodings

@pytest.mark.parametrize("codec, bad", [
    ("utf-16-le", b"\x00\xd8x\x00"),          # a high surrogate followed by 'x': not UTF-16
    ("utf-16-be", b"\xd8\x00\x00x"),
    ("utf-32-le", b"\x00\x00\x11\x00"),       # above U+10FFFF: not UTF-32
    ("utf-32-be", b"\x00\x11\x00\x00"),
])
def test_bom_marked_utf16_and_utf32_jsonl_are_decoded(con, tmp_path, codec, bad):
    bom = {"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff", "utf-32-le": b"\xff\xfe\x00\x00",
           "utf-32-be": b"\x00\x00\xfe\xff"}[codec]
    good = jsonl([{"instruction": "Ünïcode 漢字 🙂", "output": "r1", "judgment": "Wrong."},
                  {"instruction": "q2", "output": "r2"}]).encode(codec)
    broken = '{"instruction": "q3", "output": "'.encode(codec) + bad + '"}\r\n'.encode(codec)
    path = tmp_path / "wide.jsonl"
    path.write_bytes(bom + good + broken + jsonl([{"instruction": "q4", "output": "r4"}]).encode(codec))
    report = ingest_files(con, Source(paths=[str(path)]), batch="w")
    assert (report.rows_read, report.accepted, report.rejected_by_reason) == (4, 3, {"invalid_encoding": 1})
    assert [r[:2] for r in rows(con)] == [(1, "Ünïcode 漢字 🙂"), (2, "q2"), (4, "q4")]
    [(n, reason, detail, raw)] = rejects(con)
    assert (n, reason) == (3, "invalid_encoding") and codec.upper() in detail and raw.startswith('{"instruction": "q3"')


def test_utf16_json_array_and_csv_are_decoded(con, tmp_path):
    (tmp_path / "a.json").write_bytes(b"\xff\xfe" + json.dumps([{"instruction": "é1", "output": "r"}]).encode("utf-16-le"))
    (tmp_path / "b.csv").write_bytes(b"\xfe\xff" + "instruction,output\nß2,r\n".encode("utf-16-be"))
    report = ingest_files(con, Source(paths=[str(tmp_path / "a.json"), str(tmp_path / "b.csv")]), batch="w")
    assert [f.format for f in report.files] == ["json", "csv"] and report.rejected == 0
    assert {r[1] for r in rows(con)} == {"é1", "ß2"}


# ---------------------------------------------------------------- Parquet BINARY

def test_parquet_binary_columns_are_utf8_or_wrong_type(con, tmp_path):
    table = pa.table({"instruction": pa.array([b"caf\xc3\xa9", b"bad \xff byte", b"q3"], pa.binary()),
                      "response": ["r1", "r2", "r3"]})
    pq.write_table(table, tmp_path / "bin.parquet")
    report = ingest_files(con, Source(paths=[str(tmp_path / "bin.parquet")]), batch="b")
    assert (report.accepted, report.rejected_by_reason) == (2, {"wrong_type": 1})
    assert [r[1] for r in rows(con)] == ["café", "q3"]
    [(n, reason, detail, _)] = rejects(con)
    assert (n, reason) == (2, "wrong_type") and "instruction is BINARY that is not UTF-8" in detail


# ---------------------------------------------------------------- record size

def test_oversized_records_are_rejected_with_their_reason(con, tmp_path):
    big = {"instruction": "big", "output": "x" * 5000}
    (tmp_path / "a.jsonl").write_text(jsonl([{"instruction": "q1", "output": "r"}, big, {"instruction": "q3", "output": "r"}]))
    pq.write_table(pa.table({"instruction": ["p1", "big"], "response": ["r", "y" * 5000]}), tmp_path / "b.parquet")
    (tmp_path / "c.csv").write_text("instruction,output\nc1,r\nbig," + "z" * 5000 + "\nc3,r\n")
    (tmp_path / "d.json").write_text(json.dumps([big, {"instruction": "d2", "output": "r"}]))
    report = ingest_files(con, Source(paths=[str(tmp_path / n) for n in ("a.jsonl", "b.parquet", "c.csv", "d.json")]),
                          batch="o", max_record_bytes=2048)
    assert report.rejected_by_reason == {"oversized": 4}
    assert sorted(r[1] for r in rows(con)) == ["c1", "c3", "d2", "p1", "q1", "q3"]
    bad = rejects(con)
    assert all("maximum record size of 2048 bytes" in d or "Maximum line size" in d for _, _, d, _ in bad)
    assert [n for n, *_ in bad] == [2, 2, 2, 1]
    assert all(raw and len(raw) <= 10_000 for *_, raw in bad)


MEMORY = """
import resource, sys
sys.path.insert(0, {root!r})
from cut_core.data import ingest, warehouse
from cut_core.dsl import Source
from cut_core.data.ingest import jsonl
jsonl.CHUNK_BYTES = 1 << 20
con = warehouse.connect({db!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = ingest.ingest_files(con, Source(paths=[{path!r}]), batch="m", max_record_bytes=1 << 20)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(report.accepted, report.rejected_by_reason, (after - before) // 1024)
"""


@pytest.mark.slow
def test_a_64mb_record_is_rejected_without_taking_its_size_in_memory(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"instruction": "q1", "output": "r"}) + "\n")
        f.write('{"instruction": "huge", "output": "' + "x" * (64 << 20) + '"}\n')
        f.write(json.dumps({"instruction": "q3", "output": "r"}) + "\n")
    out = subprocess.run([sys.executable, "-c", MEMORY.format(root=str(ROOT), db=str(tmp_path / "w.duckdb"),
                                                              path=str(path))],
                         capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.startswith("2 {'oversized': 1}")
    assert int(out.stdout.split()[-1]) < 32, out.stdout    # MB of peak RSS growth, for a 64 MB line


# ---------------------------------------------------------------- one polarity rule

JUDGMENTS = ['"Perfect."', "Perfect", "perfect!", "“Perfect” answer", "**PERFECT**", "'perfect'", "  Perfect",
             "The response is perfect", "Not perfect", "Wrong.", '"Wrong."', '"', "Imperfect", "pérfect"]


def test_one_polarity_rule_for_sql_and_python():
    sql_con = duckdb.connect()
    for prefixes in (["Perfect"], ["Correct", "perfect"]):
        for text in JUDGMENTS:
            [(positive,)] = sql_con.execute(f"SELECT {positive_sql('$j', prefixes)}", {"j": text}).fetchall()
            assert ("positive" if positive else "negative") == polarity_of(text, prefixes), (text, prefixes)
    assert polarity_of('"Perfect."') == "positive" and polarity_of('"Wrong."') == "negative"


def test_ingest_and_judges_agree_on_quoted_perfect(con, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(jsonl([{"instruction": f"q{i}", "output": "r", "judgment": j} for i, j in enumerate(JUDGMENTS)]))
    ingest_files(con, Source(paths=[str(path)]), batch="p")
    from_files = [r[4] for r in rows(con)]
    judge = FunctionJudge(lambda instruction, response: JUDGMENTS[int(instruction[1:])])
    from_judge = [r.polarity for r in judge.judge_batch([(f"q{i}", "r") for i in range(len(JUDGMENTS))])]
    assert from_files == from_judge
    assert from_files[0] == "positive"     # '"Perfect."': positive from a file and from a judge


# ---------------------------------------------------------------- the one insert path, generations, digests

def test_judged_generations_take_the_ingest_insert_path(con, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(jsonl([{"instruction": "q", "output": "a", "judgment": "Wrong."}]))
    ingest_files(con, Source(paths=[str(path)]), batch="f")
    judged = pa.table({"prompt_index": [0, 1, 2], "instruction": ["q", "q2", "q3"], "response": ["a", "b", "c"],
                       "judgment": ["Wrong.", None, None], "polarity": ["negative", "positive", None]})
    assert wh.add_judged(con, judged, source="gen.parquet", batch="online") == 2
    got = con.sql("SELECT id, instruction, response, judgment, polarity FROM triplets WHERE batch = 'online' "
                  "ORDER BY row_number").fetchall()
    assert got == [(wh.triplet_id("q2", "b", None), "q2", "b", None, "positive"),
                   (wh.triplet_id("q3", "c", None), "q3", "c", None, None)]
    assert con.sql("SELECT source, row_number, reason, detail FROM rejects").fetchall() == [
        ("gen.parquet", 0, "duplicate", f"same triplet (id {wh.triplet_id('q', 'a', 'Wrong.')[:12]}) as {path} row 1")]


def test_generations_are_matched_by_exact_pipeline_name(con):
    frame = pa.table({"prompt_index": [0], "instruction": ["used by p"], "response": ["r"]})
    wh.replace_generations(con, frame, run="p-abc", iteration=1, model="m", pipeline="p")
    for name in ("p-v2", "p_", "P"):
        other = pa.table({"prompt_index": [0], "instruction": [f"used by {name}"], "response": ["r"]})
        wh.replace_generations(con, other, run=f"{name}-abc", iteration=1, model="m", pipeline=name)
    assert wh.used_instructions(con, "p") == ["used by p"]
    assert wh.used_instructions(con, "p_") == ["used by p_"]
    wh.replace_generations(con, pa.table({"prompt_index": [0, 1], "instruction": ["x", "y"], "response": ["r", "r"]}),
                           run="p-abc", iteration=1, model="m", pipeline="p")
    assert sorted(wh.used_instructions(con, "p")) == ["x", "y"]


def test_triplets_are_found_by_the_digest_of_their_file(con, tmp_path):
    nested = tmp_path / "data" / "deep" / "er"
    nested.mkdir(parents=True)
    (tmp_path / "data" / "top.jsonl").write_text(jsonl([{"instruction": "top", "output": "r", "judgment": None}]))
    (nested / "low.jsonl").write_text(jsonl([{"instruction": "low", "output": "r", "judgment": None}]))
    report = ingest_files(con, Source(paths=[str(tmp_path / "data" / "**" / "*.jsonl")]), batch="n")
    digests = [f.digest for f in report.files]
    assert sorted(wh.labeled_triplets(con, digests=digests)["instruction"].to_list()) == ["low", "top"]
    # The same bytes under another name are skipped, and still bring their triplets by digest.
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes((nested / "low.jsonl").read_bytes())
    again = ingest_files(con, Source(paths=[str(copy)]), batch="n2")
    assert again.skipped_files == [str(copy)]
    assert wh.labeled_triplets(con, digests=[again.files[0].digest])["instruction"].to_list() == ["low"]


def test_a_warehouse_written_before_file_digests_is_migrated(tmp_path, con):
    path = tmp_path / "a.jsonl"
    path.write_text(jsonl([{"instruction": "q", "output": "a", "judgment": "Wrong."}]))
    report = ingest_files(con, Source(paths=[str(path)]), batch="old")
    # What an earlier release left: no digest on the triplet (the column did not exist).
    con.execute("UPDATE triplets SET file_digest = NULL")
    con.close()
    reopened = wh.connect(tmp_path / "warehouse.duckdb")
    try:
        assert wh.labeled_triplets(reopened, digests=[report.files[0].digest])["instruction"].to_list() == ["q"]
        # ids are the same content hash: the same record from another file is a duplicate.
        other = tmp_path / "b.jsonl"
        other.write_text(jsonl([{"instruction": "q", "output": "a", "judgment": "Wrong."}, {"instruction": "new",
                                                                                             "output": "a"}]))
        assert ingest_files(reopened, Source(paths=[str(other)]), batch="new").rejected_by_reason == {"duplicate": 1}
    finally:
        reopened.close()


# ---------------------------------------------------------------- the command line

def test_cli_ingest_of_a_missing_file_is_one_line_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", "/missing.json", "--warehouse",
                          str(tmp_path / "w.duckdb")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip() == "error: source file not found: /missing.json"
    assert "Traceback" not in out.stdout + out.stderr
    assert not (tmp_path / "w.duckdb").exists()     # nothing was opened, no server started


def test_content_key_in_sql_equals_the_python_one():
    """Keys and ids computed by DuckDB (ingest, judged generations) equal warehouse.content_key
    and warehouse.triplet_id (with and without a multi-turn context)."""
    sql_con = duckdb.connect()
    for parts in [("q", "a", None), ("Ünï\ncode 🙂", "", "Wrong."), ("x\x00y", "r", "")]:
        params = {"a": parts[0], "b": parts[1], "c": parts[2], "d": '[{"role": "user", "content": "hi"}]'}
        [(key, flat, turns, none)] = sql_con.execute(
            f"SELECT {wh.content_key_sql('$a', '$b', '$c')}, {wh.triplet_id_sql('$a', '$b', '$c')}, "
            f"{wh.triplet_id_sql('$a', '$b', '$c', '$d')}, {wh.triplet_id_sql('$a', '$b', '$c', 'NULL::VARCHAR')}",
            params).fetchall()
        assert key == wh.content_key(*parts)
        assert flat == none == wh.triplet_id(*parts) != key
        assert turns == wh.triplet_id(*parts, params["d"]) != flat


def test_prefetched_reader_raises_at_its_chunk_and_stops_when_closed():
    """Chunks are read and checked one ahead on a thread: an error there reaches the ingest at the
    chunk where it happened (the chunks before it were handed over), and an ingest that stops
    early (an error while writing, a file already ingested) closes it and ends the thread."""
    import threading

    from cut_core.data.ingest.chunks import prefetched

    def failing():
        yield "chunk 1"
        raise OSError("disk went away")

    it = prefetched(failing())
    assert next(it) == "chunk 1"
    with pytest.raises(OSError, match="disk went away"):
        next(it)

    closed = []

    def endless():
        try:
            n = 0
            while True:
                n += 1
                yield n
        finally:
            closed.append(True)

    it = prefetched(endless())
    assert next(it) == 1
    it.close()
    assert closed == [True]
    assert not [t for t in threading.enumerate() if t.name == "ingest-reader"]

    # the thread starts at once; closed before anything was taken (a file found already
    # ingested while its first chunk was being checked), it stops all the same
    closed.clear()
    it = prefetched(endless())
    it.close()
    assert closed == [True]
    assert not [t for t in threading.enumerate() if t.name == "ingest-reader"]


def test_malformed_json_reject_names_the_parser_error(con, tmp_path):
    """A line that is not JSON is quarantined with Python's parser message (what and where), its
    raw text kept; the good lines around it, in the same chunk, are stored with no detail touched."""
    path = tmp_path / "mixed.jsonl"
    path.write_text(jsonl([{"instruction": "q1", "output": "a1"}]) + '{"instruction": "q2", "output": \n'
                    + jsonl([{"instruction": "q3", "output": "a3"}]))
    report = ingest_files(con, Source(paths=[str(path)]), batch="b")
    assert report.accepted == 2 and report.rejected_by_reason == {"malformed_json": 1}
    [(row, reason, detail, raw)] = rejects(con)
    assert (row, reason, raw) == (2, "malformed_json", '{"instruction": "q2", "output": ')
    assert detail == f"not valid JSON: {_parser_error(raw)}"
    assert [r[0] for r in rows(con)] == [1, 3]


def _parser_error(text: str) -> str:
    try:
        json.loads(text)
    except ValueError as err:
        return str(err)
    raise AssertionError("expected invalid JSON")
