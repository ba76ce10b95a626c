"""Fuzzing ingestion: a seeded random JSONL corpus with every kind of bad line among good ones.

Proves, for several seeds, block sizes (lines straddling and exceeding a read block, duplicates
in different blocks: duplicates of rows already written in the same transaction) and both
contradiction policies: ingestion never crashes; every non-blank
line ends in exactly one place (accepted + rejected == rows_read, one triplet or one reject per
line number); every reject carries a known reason code, a detail and its raw text (the line
itself, terminator stripped); each planted bad line is rejected with the reason code of its
class; each good line becomes the triplet its record describes (instruction + input, polarity,
contradiction flag, id = content_key), whatever the block and flush size.
"""

from __future__ import annotations

import json
import random

import pytest

from cut_core import ingest
from cut_core import warehouse as wh
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
        key = wh.content_key(instruction, rec["output"], judgment)
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
    (1, ingest.CHUNK_BYTES, False),
    (2, 16384, False),
    (3, 8192, True),
    (4, 4096, True),
])
def test_fuzzed_corpus_every_line_accounted_for(tmp_path, monkeypatch, seed, chunk_bytes, quarantine):
    data, expected = make_corpus(seed, lines=2000, quarantine=quarantine)
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(data)
    monkeypatch.setattr(ingest, "CHUNK_BYTES", chunk_bytes)
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
