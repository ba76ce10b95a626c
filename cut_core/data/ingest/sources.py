"""Which files a source names, in which format, under which digest: paths and globs read
literally, Hugging Face `datasets` folders (format="hf"), format detection, the file digest that
makes ingest idempotent, and check_sources (inputs checked before anything is opened)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from cut_core import dsl
from cut_core.data.ingest.chunks import wide_encoding
from cut_core.data.ingest.report import IngestError

# Bump when the validation rules change: the digest of a file includes it, so a file ingested
# under old rules is read again under new ones instead of being skipped.
RULES_VERSION = "1"
# A record longer than this (bytes of its line, or of its JSON rendering) is rejected as
# `oversized` without being parsed; dsl.Ingestion.max_record_bytes sets it per pipeline.
DEFAULT_MAX_RECORD_BYTES = dsl.DEFAULT_MAX_RECORD_BYTES


_GLOB_CHARS = re.compile(r"[*?\[]")


def hf_files(folder: Path) -> list[Path]:
    """The data files of a Hugging Face `datasets` folder, in order: a save_to_disk Dataset
    (state.json lists its Arrow files), a DatasetDict (dataset_dict.json lists its splits, each
    such a folder), else hub-layout Parquet shards (e.g. data/train-00000-of-00002.parquet)."""
    state, splits = folder / "state.json", folder / "dataset_dict.json"
    try:
        if state.is_file():
            files = [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        elif splits.is_file():
            files = [f for split in json.loads(splits.read_text())["splits"] for f in hf_files(folder / split)]
        else:
            files = sorted(p for p in folder.rglob("*.parquet") if p.is_file())
    except (ValueError, KeyError, TypeError) as err:
        raise IngestError(f"{folder} is not a readable `datasets` folder: {err!r} in its state.json / "
                          "dataset_dict.json") from err
    if not files:
        raise IngestError(f"{folder} holds no `datasets` data: no state.json (save_to_disk), no dataset_dict.json "
                          "and no .parquet shards")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise IngestError(f"{folder}: files its state.json lists are missing: {missing[:3]}")
    return files


def expand_paths(patterns: Iterable[str], *, base: str | Path | None = None, folders: bool = False) -> list[Path]:
    """Files named by paths and glob patterns (`**` recurses), in the order given, each once.

    Relative patterns are taken against `base` (default: the working directory). A path that
    names an existing file is that file, even with * ? [ in its name; otherwise those characters
    make a glob. A pattern that matches nothing is an error: a typo must not look like an empty
    source.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        p = Path(pattern)
        if base is not None and not p.is_absolute():
            p = Path(base) / p
        if p.is_file():
            matches = [p]
        elif _GLOB_CHARS.search(str(p)):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise IngestError(f"no file matches {pattern!r} (looked for {p})")
        elif p.is_dir() and folders:
            matches = hf_files(p)
        elif p.is_dir():
            raise IngestError(f"{p} is a folder; name files or a glob such as {p}/*.jsonl (a Hugging Face "
                              "`datasets` folder: format='hf')")
        else:
            raise IngestError(f"source file not found: {p}")
        for m in matches:
            # absolute but not resolved: the path a user (and glob) names is the one recorded
            m = Path(os.path.abspath(m))
            if m not in seen:
                seen.add(m)
                out.append(m)
    return out


_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonlines": "jsonl", ".json": "json",
               ".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv", ".tab": "csv",
               ".arrow": "arrow"}


def detect_format(path: Path, declared: str = "auto") -> str:
    """jsonl | json | parquet | csv | arrow. A .json file whose first non-blank byte is not '['
    is read as JSON lines (many .json files are), so 'json' always means a JSON array here.
    'hf' (a `datasets` folder's files) is decided per file: .arrow or .parquet."""
    if declared == "hf":
        fmt = _EXTENSIONS.get(path.suffix.lower())
        if fmt not in ("arrow", "parquet"):
            raise IngestError(f"format='hf' reads `datasets` Arrow files and Parquet shards; {path} is neither")
        return fmt
    fmt = declared if declared != "auto" else _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise IngestError(f"cannot tell the format of {path} from its extension; set Source.format "
                          "to one of jsonl, json, parquet, csv, arrow, hf")
    if fmt == "json":
        with open(path, "rb") as f:
            head = f.read(4096)
        wide = wide_encoding(path)
        if wide:
            head = head[wide[2]:].decode(wide[0], "ignore").encode()
        if not head.lstrip(b" \t\r\n\xef\xbb\xbf").startswith(b"["):
            fmt = "jsonl"
    return fmt


def file_digest(path: Path, source: dsl.Source, fmt: str, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> str:
    """sha256 of the file bytes + the settings that change what its rows become. Settings added
    later (delimiter, max_record_bytes) enter only when they differ from their defaults, so a
    file ingested by an earlier release keeps its digest and is not read twice."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(hashlib.file_digest(f, "sha256").digest())
    settings = {"rules": RULES_VERSION, "format": fmt, "columns": source.columns,
                "polarity": source.polarity.model_dump(mode="json"), "labeled": source.labeled}
    if source.delimiter:
        settings["delimiter"] = source.delimiter
    if max_record_bytes != DEFAULT_MAX_RECORD_BYTES:
        settings["max_record_bytes"] = max_record_bytes
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def check_sources(sources: Sequence[dsl.Source], *, base: str | Path | None = None) -> list[tuple[dsl.Source, Path]]:
    """The files of the sources with their formats checked, before anything is opened for
    writing: raises IngestError (a missing file, a pattern matching nothing, an unknown format)."""
    files = [(src, p) for src in sources for p in expand_paths(src.paths, base=base, folders=src.format == "hf")]
    for src, p in files:
        detect_format(p, src.format)
    return files
