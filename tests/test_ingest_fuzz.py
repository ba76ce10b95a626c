"""Fuzzing ingestion: a seeded random JSONL corpus with every kind of bad line among good ones.

Proves, for several seeds, block sizes (lines straddling and exceeding a read block, duplicates
in different blocks: duplicates of rows already written in the same transaction) and both
contradiction policies: ingestion never crashes; every non-blank
line ends in exactly one place (accepted + rejected == rows_read, one triplet or one reject per
line number); every reject carries a known reason code, a detail and its raw text (the line
itself, terminator stripped); each planted bad line is rejected with the reason code of its
class; each good line becomes the triplet its record describes (instruction + input, polarity,
contradiction flag, id = triplet_id), whatever the block and flush size.

The second corpus (test_second_corpus_...) covers the inputs the first cannot: a BOM-marked
UTF-16/32 JSONL file with undecodable and oversized lines and a name with glob characters next
to the file that name would match as a glob, a Parquet file with a BINARY column holding
non-UTF-8 values and oversized records, and a CSV with quoted delimiters, doubled quotes,
newlines in fields and oversized records; each row ends in the one table and reason expected.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cut_core.data import ingest
from cut_core.data.ingest import jsonl
from cut_core.data import warehouse as wh
from cut_core.dsl import Polarity, Source

ALPHABET = list("abcdefghij klmnop XYZ 0123 .,;:!?\"'\\/{}[]\t\n") + ["é", "ß", "漢字", "🙂", "\u2028", "ǅ"]


def text(rng: random.Random, lo: int = 1, hi: int = 40) -> str:
    out = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(lo, hi)))
    return out if out.strip() else out + "x"


def good_record(rng: random.Random) -> tuple[dict, str | None, bool]:
    """A valid record, its expected polarity and whether it contradicts itself."""
    rec = {"instruction": text(rng), "output": text(rng, 1, 200)}
    if rng.random() < 0.3:
        rec["input"] = rng.choice(["", "  ", text(rng)])
    kind = rng.choice(["null", "perfect", "negative", "empty", "contradiction", "absent"])
    rec["judgment"] = {"null": None, "perfect": rng.choice(["Perfect", " perfect!", "PERFECT answer"]),
                       "negative": "Wrong: " + text(rng), "empty": rng.choice(["", "  \n"]),
                       "contradiction": "The response is perfect, " + text(rng), "absent": None}[kind]
    if kind == "absent":
        del rec["judgment"]
    if rng.random() < 0.2:
        rec["extra"] = {"nested": [1, {"x": text(rng)}]}
    polarity = None if kind == "absent" else "negative" if kind in ("negative", "contradiction") else "positive"
    return rec, polarity, kind == "contradiction"


def dumps(rng: random.Random, rec) -> bytes:
    return json.dumps(rec, ensure_ascii=rng.random() < 0.5).encode()


def bad_line(rng: random.Random, kind: str) -> bytes:
    rec, _, _ = good_record(rng)
    if kind == "malformed_json":
        line = dumps(rng, rec)
        cut = line.decode()[: rng.randint(1, len(line.decode()) - 1)].encode()   # never mid-character
        return rng.choice([cut, line + b" trailing", b"{'single': 'quotes'}",
                           b'{"instruction": "tab\tinside", "output": "x"}', b"{", b'{"a" 1}', b"nul"])
    if kind == "not_an_object":
        return rng.choice([b"[1, 2]", b"42", b'"a string"', b"true", b"null", dumps(rng, [rec])])
    if kind == "missing_instruction":
        rng.choice([lambda: rec.pop("instruction"), lambda: rec.update(instruction=None),
                    lambda: rec.update(instruction=""), lambda: rec.update(instruction=" \n\t ")])()
        return dumps(rng, rec)
    if kind == "missing_response":
        rng.choice([lambda: rec.pop("output"), lambda: rec.update(output=None), lambda: rec.update(output=""),
                    lambda: rec.update(output="   ")])()
        return dumps(rng, rec)
    if kind == "wrong_type":
        field, value = rng.choice([("instruction", 5), ("output", ["a"]), ("judgment", {"j": 1}),
                                   ("input", True), ("refined", 3.5), ("instruction", False)])
        rec[field] = value
        return dumps(rng, rec)
    if kind == "invalid_utf8":
        line = json.dumps(rec, ensure_ascii=True).encode()
        at = line.index(b'"output": "') + len(b'"output": "')
        return line[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88"]) + line[at:]
    if kind == "failed_judgment":
        rec["judgment"] = rng.choice(["$ERROR$", " $ERROR$\n"])
        return dumps(rng, rec)
    raise ValueError(kind)


BAD_KINDS = ["malformed_json", "not_an_object", "missing_instruction", "missing_response", "wrong_type",
             "invalid_utf8", "failed_judgment"]


def make_corpus(seed: int, lines: int, quarantine: bool):
    """(bytes, expected) where expected maps line number -> ("reject", reason) or ("accept", fields)."""
    rng = random.Random(seed)
    out: list[bytes] = []
    expected: dict[int, tuple] = {}
    seen: dict[str, int] = {}
    good_lines: list[bytes] = []
    for n in range(1, lines + 1):
        roll = rng.random()
        if roll < 0.03:
            out.append(rng.choice([b"", b"   ", b"\t"]))              # blank: not a row
            continue
        if roll < 0.30:
            kind = BAD_KINDS[n % len(BAD_KINDS)] if roll < 0.25 else "duplicate"
            if kind == "duplicate" and good_lines:
                out.append(rng.choice(good_lines))
                expected[n] = ("reject", "duplicate")
                continue
            if kind != "duplicate":
                out.append(bad_line(rng, kind))
                expected[n] = ("reject", kind)
                continue
        rec, polarity, contradiction = good_record(rng)
        line = dumps(rng, rec)
        if rng.random() < 0.1:
            line += b"\r"                                            # CRLF line ending
        if rng.random() < 0.02:
            rec["output"] += "x" * 10_000                            # longer than a small read block
            line = dumps(rng, rec)
        out.append(line)
        instruction = rec["instruction"]
        if rec.get("input", "").strip():
            instruction += "\n" + rec["input"]
        judgment = rec.get("judgment") if polarity is not None else None
        judgment = judgment if judgment and judgment.strip() else None
        key = wh.triplet_id(instruction, rec["output"], judgment)
        if key in seen:
            expected[n] = ("reject", "duplicate")
        elif contradiction and quarantine:
            expected[n] = ("reject", "contradiction")
        else:
            seen[key] = n
            good_lines.append(line)
            expected[n] = ("accept", (key, instruction, rec["output"], judgment, polarity, contradiction))
    return b"\xef\xbb\xbf" + b"\n".join(out) + (b"\n" if rng.random() < 0.5 else b""), expected


@pytest.mark.parametrize("seed, chunk_bytes, quarantine", [
    (1, jsonl.CHUNK_BYTES, False),
    (2, 16384, False),
    (3, 8192, True),
    (4, 4096, True),
])
def test_fuzzed_corpus_every_line_accounted_for(tmp_path, monkeypatch, seed, chunk_bytes, quarantine):
    data, expected = make_corpus(seed, lines=2000, quarantine=quarantine)
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(data)
    monkeypatch.setattr(jsonl, "CHUNK_BYTES", chunk_bytes)
    con = wh.connect(tmp_path / "wh.duckdb")
    report = ingest.ingest_files(con, Source(paths=[str(path)], polarity=Polarity(quarantine_contradictions=quarantine)),
                                 batch="fuzz")

    assert report.rows_read == len(expected)
    assert report.accepted + report.rejected == report.rows_read
    got_rejects = con.sql("SELECT row_number, reason, detail, raw FROM rejects").fetchall()
    got_triplets = con.sql("SELECT row_number, id, instruction, response, judgment, polarity, contradiction "
                           "FROM triplets").fetchall()
    numbers = [r[0] for r in got_rejects] + [t[0] for t in got_triplets]
    assert sorted(numbers) == sorted(expected), "every non-blank line ends in exactly one table"

    assert all(reason in ingest.REASONS and detail and raw is not None for _, reason, detail, raw in got_rejects)
    lines = data[3:].split(b"\n")     # after the byte-order mark; line n is lines[n - 1]
    for n, reason, _, raw in got_rejects:
        line = lines[n - 1].decode("utf-8", "replace" if reason == "invalid_utf8" else "strict")
        assert raw == line.rstrip("\r\n"), (n, reason)
    wanted = {n: e[1] for n, e in expected.items() if e[0] == "reject"}
    assert {n: reason for n, reason, _, _ in got_rejects} == wanted
    assert set(wanted.values()) >= set(BAD_KINDS) | {"duplicate"} | ({"contradiction"} if quarantine else set())

    accepted = {n: e[1] for n, e in expected.items() if e[0] == "accept"}
    assert {n: tuple(rest) for n, *rest in got_triplets} == accepted
    assert report.contradictions == sum(1 for e in accepted.values() if e[5])
    assert report.unlabeled == sum(1 for e in accepted.values() if e[4] is None)
    con.close()


# ---------------------------------------------------------------- the second corpus: bad inputs by format

WIDE = {"utf-16-le": (b"\xff\xfe", [b"\x00\xd8x\x00", b"\x00\xdc"]), "utf-16-be": (b"\xfe\xff", [b"\xd8\x00\x00x"]),
        "utf-32-le": (b"\xff\xfe\x00\x00", [b"\x00\x00\x11\x00", b"\x00\xd8\x00\x00"]),
        "utf-32-be": (b"\x00\x00\xfe\xff", [b"\x00\x11\x00\x00"])}
MAX_RECORD = 4096


def wide_corpus(rng: random.Random, codec: str, lines: int):
    """(bytes, expected) of a BOM-marked UTF-16/32 JSONL file with undecodable and oversized lines."""
    bom, bad_units = WIDE[codec]
    out, expected, seen = [], {}, set()
    for n in range(1, lines + 1):
        roll = rng.random()
        rec, polarity, _ = good_record(rng)
        rec.pop("judgment", None)
        if roll < 0.03:
            out.append(rng.choice(["", "  "]).encode(codec))
            continue
        if roll < 0.12:
            text = json.dumps(rec, ensure_ascii=False)
            cut = rng.randint(1, len(text) - 1)
            out.append(text[:cut].encode(codec) + rng.choice(bad_units) + text[cut:].encode(codec))
            expected[n] = ("reject", "invalid_encoding")
            continue
        if roll < 0.18:
            rec["output"] = "y" * rng.randint(MAX_RECORD, 3 * MAX_RECORD)
            expected[n] = ("reject", "oversized")
        out.append(json.dumps(rec, ensure_ascii=rng.random() < 0.5).encode(codec))
        if n not in expected:
            instruction = rec["instruction"] + ("\n" + rec["input"] if rec.get("input", "").strip() else "")
            key = wh.triplet_id(instruction, rec["output"], None)
            expected[n] = ("reject", "duplicate") if key in seen else ("accept", instruction)
            seen.add(key)
    newline = "\n".encode(codec)
    return bom + newline.join(out) + newline, expected


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_second_corpus_encodings_binary_sizes_and_literal_names(tmp_path, monkeypatch, seed):
    rng = random.Random(seed)
    monkeypatch.setattr(jsonl, "CHUNK_BYTES", rng.choice([8192, 65536, jsonl.CHUNK_BYTES]))
    codec = list(WIDE)[seed % len(WIDE)]
    data, expected_wide = wide_corpus(rng, codec, 600)
    wide_path = tmp_path / f"wide[{seed}].jsonl"          # a literal name with glob characters
    wide_path.write_bytes(data)
    (tmp_path / f"wide{seed}.jsonl").write_text('{"instruction": "decoy", "output": "x"}\n')

    # Parquet: a BINARY instruction column, some values not UTF-8, some records too long.
    instructions, responses, expected_pq = [], [], {}
    for n in range(1, 301):
        ins = text(rng).encode()
        kind = rng.random()
        if kind < 0.1:
            ins = ins[:3] + rng.choice([b"\xff", b"\xc3(", b"\xed\xa0\x80"]) + ins[3:]
            expected_pq[n] = ("reject", "wrong_type")
        response = text(rng, 1, 100) + ("z" * 2 * MAX_RECORD if 0.1 <= kind < 0.15 else "") + f" #{n}"
        if 0.1 <= kind < 0.15:
            expected_pq[n] = ("reject", "oversized")
        if n not in expected_pq:
            expected_pq[n] = ("accept", ins.decode())
        instructions.append(ins)
        responses.append(response)
    pq_path = tmp_path / f"bin?{seed}.parquet"
    pq.write_table(pa.table({"instruction": pa.array(instructions, pa.binary()), "response": responses}), pq_path)

    # CSV: quoted fields with delimiters, doubled quotes and newlines; oversized records.
    csv_rows, expected_csv = ["instruction,output"], {}
    for n in range(1, 301):
        ins = text(rng).replace("\r", " ")
        out = text(rng, 1, 60).replace("\r", " ") + f" #{n}"
        if rng.random() < 0.05:
            out += "w" * 2 * MAX_RECORD
            expected_csv[n] = ("reject", "oversized")
        else:
            expected_csv[n] = ("accept", ins)
        csv_rows.append(",".join('"' + v.replace('"', '""') + '"' for v in (ins, out)))
    csv_path = tmp_path / f"q*{seed}.csv"
    csv_path.write_text("\n".join(csv_rows) + "\n", encoding="utf-8")

    con = wh.connect(tmp_path / "wh.duckdb")
    report = ingest.ingest_files(con, Source(paths=[str(wide_path), str(pq_path), str(csv_path)]), batch="fuzz2",
                                 max_record_bytes=MAX_RECORD)
    assert [Path(f.path).name for f in report.files] == [wide_path.name, pq_path.name, csv_path.name]
    for path, expected in ((wide_path, expected_wide), (pq_path, expected_pq), (csv_path, expected_csv)):
        got_rejects = dict(con.execute("SELECT row_number, reason FROM rejects WHERE source = ?", [str(path)]).fetchall())
        got_triplets = dict(con.execute("SELECT row_number, instruction FROM triplets WHERE source = ?",
                                        [str(path)]).fetchall())
        assert not set(got_rejects) & set(got_triplets), "a row in both tables"
        assert {n: ("reject", r) for n, r in got_rejects.items()} | {n: ("accept", i) for n, i in got_triplets.items()} \
            == expected, path.name
        details = con.execute("SELECT reason, detail, raw FROM rejects WHERE source = ?", [str(path)]).fetchall()
        assert all(d and raw is not None for _, d, raw in details)
        assert all(codec.upper() in d for r, d, _ in details if r == "invalid_encoding")
    assert report.rows_read == sum(len(e) for e in (expected_wide, expected_pq, expected_csv))
    con.close()
