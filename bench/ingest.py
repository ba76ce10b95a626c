"""Ingestion speed and memory: cut_core.data.ingest against a plain json + pandas loop and DuckDB's floor.

    python bench/ingest.py                 # 1,000,000 synthetic triplets (~0.5 kB each)
    python bench/ingest.py --rows 100000   # quicker

Generates a JSONL file of synthetic triplets with a small fraction of bad lines of every kind
(malformed JSON, invalid UTF-8, non-objects, missing/blank fields, wrong types, failed judge
markers, exact duplicates, blank lines), then, in the same run and on the same file, each in
its own subprocess so that its peak RSS (ru_maxrss) is its own:

  library   cut_core.data.ingest.ingest_files (the code the flows run)
  baseline  the same work written plainly: json.loads per line, validation in Python,
            warehouse.triplet_id per row, a pandas DataFrame, drop_duplicates, then the same
            inserts into the same warehouse tables (triplets, rejects, ingested_files)
  floor     DuckDB's read_json(..., ignore_errors = true) into a table: no validation, no
            rejects, no ids, no dedupe; what reading and storing the file costs at the least

Library and baseline must end with the same counts (checked). Then the fixed start-up cost of
`cut-align ingest` is measured on a one-line file (with --no-prefect, and with the Prefect flow
run and its temporary server). The last line printed is one JSON object with rows_per_s,
baseline_rows_per_s, speedup, floor_seconds, floor_ratio (library / floor; floor_ratios: each
round's own, with --rounds), CPU seconds, the phase timings, peak_rss_mb, startup seconds and
the bars (floor_ratio <= 3, peak RSS <= 1024 MB, counts equal to the baseline's; the old
`speedup >= 10` bar is withdrawn: it depends on the machine). DuckDB uses every core for the library
and the floor, the baseline one: on a machine whose cores are busy with other work the
wall-clock ratios move; load_average_1m says how busy it was.
`--data FILE` reuses a generated file (the same file in every run compares like with like).
Not part of the test run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the a model answer response judgment correct wrong step because therefore value number result "
         "sum compute explain first second then finally list example please write short story about city "
         "river mountain history science reason carefully check units total each").split()


# ---------------------------------------------------------------- synthetic data

def generate(path: Path, rows: int, seed: int = 0) -> dict[str, int]:
    """Write `rows` lines (~0.5 kB each); about 0.5% are bad, one kind at a time, round robin."""
    rng = random.Random(seed)
    planted: dict[str, int] = {}
    bad_kinds = ["malformed_json", "invalid_utf8", "not_an_object", "missing_instruction", "missing_response",
                 "wrong_type", "failed_judgment", "duplicate", "blank"]
    earlier: list[bytes] = []

    def text(n: int) -> str:
        return " ".join(rng.choices(WORDS, k=n))

    with open(path, "wb") as f:
        for i in range(rows):
            record = {"id": i, "instruction": f"Task {i}: {text(12)}", "input": text(6) if i % 4 == 0 else "",
                      "output": text(48), "judgment": None if i % 3 == 0 else f"The answer is wrong: {text(14)}"}
            line = json.dumps(record).encode()
            kind = bad_kinds[(i // 200) % len(bad_kinds)] if i % 200 == 199 else None
            if kind == "malformed_json":
                line = line[: len(line) // 2]
            elif kind == "invalid_utf8":
                line = line[:40] + b"\xff\xfe" + line[40:]
            elif kind == "not_an_object":
                line = json.dumps([record["instruction"], record["output"]]).encode()
            elif kind == "missing_instruction":
                line = json.dumps({**record, "instruction": "  "}).encode()
            elif kind == "missing_response":
                line = json.dumps({k: v for k, v in record.items() if k != "output"}).encode()
            elif kind == "wrong_type":
                line = json.dumps({**record, "output": 42}).encode()
            elif kind == "failed_judgment":
                line = json.dumps({**record, "judgment": "$ERROR$"}).encode()
            elif kind == "duplicate" and earlier:
                line = earlier[rng.randrange(len(earlier))]
            elif kind == "blank":
                line = b""
            if kind:
                planted[kind] = planted.get(kind, 0) + 1
            elif len(earlier) < 1000:
                earlier.append(line)
            f.write(line + b"\n")
    return planted


# ---------------------------------------------------------------- the two workers

def run_library(data: Path, wh: Path) -> dict:
    from cut_core import dsl
    from cut_core.data import ingest, warehouse
    con = warehouse.connect(wh)
    rss_before = _rss_mb()
    t0, cpu0 = time.perf_counter(), _cpu_s()
    report = ingest.ingest_files(con, dsl.Source(paths=[str(data)]), batch="bench")
    con.close()    # a checkpoint on close counts: work deferred to it is still the ingest's
    seconds, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    # digest: hashing the file (while the first chunk is checked); check: the checking thread's
    # time (reading, validation, ids, one chunk ahead); write: the writing thread's (dedupe,
    # inserts, commit). The three overlap, so they add up to more than `seconds`.
    phases = {k: round(v, 2) for k, v in report.files[0].seconds.items()}
    return {"seconds": seconds, "cpu_seconds": round(cpu, 2), "phases": phases, "rss_before_mb": rss_before,
            "peak_rss_mb": _rss_mb(), **_counts(report.to_dict())}


def run_baseline(data: Path, wh: Path) -> dict:
    """The straightforward implementation of the same rules, one Python step per line."""
    import pandas as pd

    from cut_core import dsl
    from cut_core.data import warehouse
    con = warehouse.connect(wh)
    rss_before = _rss_mb()
    t0, cpu0 = time.perf_counter(), _cpu_s()
    pol = dsl.Polarity()
    positive = tuple(p.lower() for p in pol.positive_prefixes)
    contra = tuple(p.lower() for p in pol.contradiction_prefixes)
    markers = {m.strip() for m in pol.failed_markers}
    with open(data, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    good, bad = [], []
    source = str(data.resolve())
    with open(data, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                bad.append((n, raw.decode("utf-8", "replace").rstrip("\r\n"), "invalid_utf8", str(err)))
                continue
            try:
                rec = json.loads(line)
            except ValueError as err:
                bad.append((n, line, "malformed_json", str(err)))
                continue
            if not isinstance(rec, dict):
                bad.append((n, line, "not_an_object", type(rec).__name__))
                continue
            ins, inp, judgment = rec.get("instruction"), rec.get("input"), rec.get("judgment")
            resp = rec["response"] if "response" in rec else rec.get("output")
            if any(v is not None and not isinstance(v, str) for v in (ins, inp, resp, judgment, rec.get("refined"))):
                bad.append((n, line, "wrong_type", "a text field is not a string"))
                continue
            if ins is None or not ins.strip():
                bad.append((n, line, "missing_instruction", "instruction missing or blank"))
                continue
            if resp is None or not resp.strip():
                bad.append((n, line, "missing_response", "response missing or blank"))
                continue
            labeled = "judgment" in rec
            if judgment is not None and not judgment.strip():
                judgment = None
            if labeled and judgment is not None and judgment.strip() in markers:
                bad.append((n, line, "failed_judgment", judgment.strip()))
                continue
            if inp and inp.strip():
                ins = ins + "\n" + inp
            if not labeled:
                polarity = None
            elif judgment is None or judgment.lstrip().lower().startswith(positive):
                polarity = "positive"
            else:
                polarity = "negative"
            contradiction = polarity == "negative" and judgment.lstrip().lower().startswith(contra)
            good.append((warehouse.triplet_id(ins, resp, judgment), ins, resp, judgment, polarity,
                         rec.get("refined"), contradiction, n))
    t_parsed = time.perf_counter()
    df = pd.DataFrame(good, columns=["id", "instruction", "response", "judgment", "polarity", "refined",
                                     "contradiction", "row_number"])
    existing = set(r[0] for r in con.execute("SELECT id FROM triplets").fetchall())
    dup = df["id"].duplicated(keep="first") | df["id"].isin(existing)
    dups = df[dup]
    df = df[~dup]
    rejects = pd.DataFrame(bad, columns=["row_number", "raw", "reason", "detail"])
    if len(dups):
        rejects = pd.concat([rejects, pd.DataFrame({"row_number": dups["row_number"], "raw": None,
                                                    "reason": "duplicate", "detail": "duplicate id " + dups["id"]})])
    t_frames = time.perf_counter()
    con.execute("BEGIN TRANSACTION")
    con.execute("INSERT INTO triplets (id, instruction, response, judgment, polarity, refined, contradiction, batch, "
                "source, row_number) SELECT id, instruction, response, judgment, polarity, refined, contradiction, "
                "'bench', ?, row_number FROM df", [source])
    con.execute("INSERT INTO rejects (source, row_number, raw, reason, detail, batch) "
                "SELECT ?, row_number, raw, reason, detail, 'bench' FROM rejects", [source])
    con.execute("INSERT INTO ingested_files VALUES (?, ?, ?, ?, ?, 'bench', current_timestamp)",
                [digest, source, len(df) + len(rejects), len(df), len(rejects)])
    t_inserted = time.perf_counter()
    con.execute("COMMIT")
    con.close()
    seconds = time.perf_counter() - t0
    phases = {"parse_validate_hash": t_parsed - t0, "dataframe_dedupe": t_frames - t_parsed,
              "insert": t_inserted - t_frames, "commit": t0 + seconds - t_inserted}
    by_reason = rejects["reason"].value_counts().to_dict()
    return {"seconds": seconds, "cpu_seconds": round(_cpu_s() - cpu0, 2),
            "phases": {k: round(v, 2) for k, v in phases.items()}, "rss_before_mb": rss_before,
            "peak_rss_mb": _rss_mb(), "rows_read": len(df) + len(rejects), "accepted": len(df), "rejected": len(rejects),
            "rejected_by_reason": dict(sorted((k, int(v)) for k, v in by_reason.items())),
            "positives": int((df["polarity"] == "positive").sum()), "negatives": int((df["polarity"] == "negative").sum())}


def _counts(report: dict) -> dict:
    return {k: report[k] for k in ("rows_read", "accepted", "rejected", "rejected_by_reason", "positives", "negatives")}


def _cpu_s() -> float:
    """CPU seconds of this process, all threads (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_floor(data: Path, wh: Path) -> dict:
    """DuckDB alone: read the JSON lines into a table, skipping what it cannot parse."""
    import duckdb
    con = duckdb.connect(str(wh))
    rss_before = _rss_mb()
    t0, cpu0 = time.perf_counter(), _cpu_s()
    con.execute("SET enable_progress_bar = false")
    con.execute(f"CREATE TABLE floor AS SELECT * FROM read_json('{data}', format = 'newline_delimited', "
                "ignore_errors = true)")
    rows = con.sql("SELECT count(*) FROM floor").fetchall()[0][0]
    con.close()
    seconds, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    return {"seconds": seconds, "cpu_seconds": round(cpu, 2), "rss_before_mb": rss_before,
            "peak_rss_mb": _rss_mb(), "rows_stored": rows}


def startup_seconds(workdir: Path, prefect: bool) -> float | str:
    """Wall seconds of `cut-align ingest` on a one-line file: the command's fixed cost (or, when
    the command failed, its last line of error)."""
    one = workdir / "one.jsonl"
    one.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    wh = workdir / f"startup-{prefect}.duckdb"
    cmd = [sys.executable, "-m", "flows.cli", "ingest", str(one), "--warehouse", str(wh)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd + ([] if prefect else ["--no-prefect"]), capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        lines = [line for line in out.stderr.splitlines() if line.startswith("error")] or out.stderr.splitlines()
        return f"failed after {time.perf_counter() - t0:.1f}s: {lines[-1] if lines else out.returncode}"
    return round(time.perf_counter() - t0, 2)


def _worker(kind: str, data: Path, workdir: Path) -> dict:
    wh = workdir / f"{kind}.duckdb"
    for p in (wh, Path(str(wh) + ".wal")):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(data), "--warehouse", str(wh)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["warehouse_mb"] = round(wh.stat().st_size / 2**20, 1)
    wh.unlink(missing_ok=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--workdir", type=Path, default=None, help="where the data and warehouses go (default: a temp dir)")
    ap.add_argument("--worker", choices=["library", "baseline", "floor"], help=argparse.SUPPRESS)
    ap.add_argument("--no-prefect-startup", action="store_true",
                    help="skip timing `cut-align ingest` with a Prefect flow run (it starts a temporary server)")
    ap.add_argument("--data", type=Path, help="JSONL file to use; generated there when missing (default: a temp file)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run library and baseline alternately this many times; report the medians")
    ap.add_argument("--warehouse", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run = {"library": run_library, "baseline": run_baseline, "floor": run_floor}[args.worker]
        print(json.dumps(run(args.data, args.warehouse)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        data = args.data or workdir / "triplets.jsonl"
        if not data.exists():
            t0 = time.perf_counter()
            planted = generate(data, args.rows)
            print(f"generated {args.rows} lines, bad lines planted {planted} in {time.perf_counter() - t0:.1f}s",
                  flush=True)
        size_mb = data.stat().st_size / 2**20
        runs: dict[str, list[dict]] = {"library": [], "baseline": [], "floor": []}
        for _ in range(args.rounds):
            for kind in runs:
                runs[kind].append(_worker(kind, data, workdir))
                print(f"{kind:8}: {runs[kind][-1]}", flush=True)
        startup = {"startup_seconds": startup_seconds(workdir, prefect=False)}
        if not args.no_prefect_startup:
            startup["startup_prefect_seconds"] = startup_seconds(workdir, prefect=True)
        print(f"startup : {startup}", flush=True)
    # the run with the median time of each (the first of the middle two for an even count)
    lib, base, floor = (sorted(r, key=lambda x: x["seconds"])[(len(r) - 1) // 2] for r in runs.values())

    keys = ("rows_read", "accepted", "rejected", "rejected_by_reason", "positives", "negatives")
    agree = all(lib[k] == base[k] for k in keys)
    rows = lib["rows_read"]
    result = {
        "rows": rows, "file_mb": round(size_mb, 1), "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),   # other work on the machine shares the cores
        "seconds": round(lib["seconds"], 2), "baseline_seconds": round(base["seconds"], 2),
        "cpu_seconds": lib["cpu_seconds"], "baseline_cpu_seconds": base["cpu_seconds"],
        "rows_per_s": round(rows / lib["seconds"]), "baseline_rows_per_s": round(base["rows_read"] / base["seconds"]),
        "speedup": round(base["seconds"] / lib["seconds"], 2),
        "floor_seconds": round(floor["seconds"], 2), "floor_cpu_seconds": floor["cpu_seconds"],
        "floor_ratio": round(lib["seconds"] / floor["seconds"], 2),
        "floor_rows_stored": floor["rows_stored"], "floor_peak_rss_mb": round(floor["peak_rss_mb"]),
        # each round's library time over the same round's floor (the spread under the median)
        "floor_ratios": [round(lb["seconds"] / fl["seconds"], 2) for lb, fl in zip(runs["library"], runs["floor"])],
        **startup,
        # the library's phases overlap (the checking thread runs a chunk ahead of the writer)
        "phases": lib["phases"], "baseline_phases": base["phases"],
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["library"])),   # the worst run
        "rss_before_ingest_mb": round(lib["rss_before_mb"]),
        "baseline_peak_rss_mb": round(base["peak_rss_mb"]),
        "warehouse_mb": lib["warehouse_mb"], "rejected_by_reason": lib["rejected_by_reason"],
        "counts_agree_with_baseline": agree,
        "bar_floor_ratio_3": lib["seconds"] / floor["seconds"] <= 3.0,
        "bar_rss_1gib": max(r["peak_rss_mb"] for r in runs["library"]) <= 1024,
        "bar_counts_agree": agree,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
