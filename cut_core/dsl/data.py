"""Data sections: Polarity (how a judgment becomes a label), Source (files and column maps), Ingestion (limits)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cut_core.data import polarity

from cut_core.dsl.base import CANONICAL_COLUMNS, Section

# ---------------------------------------------------------------- data sources

class Polarity(Section):
    positive_prefixes: list[str] = Field(
        default_factory=lambda: list(polarity.DEFAULT_POSITIVE_PREFIXES),
        description="a judgment starting with one of these (case-insensitive) is positive; "
        "a null/empty judgment is always positive",
    )
    score_column: str | None = Field(
        default=None, description="optional numeric column: rows with score >= score_threshold are positive")
    score_threshold: float | None = Field(
        default=None, description="threshold for score_column (required when score_column is set)")
    failed_markers: list[str] = Field(
        default_factory=lambda: list(polarity.DEFAULT_FAILED_MARKERS),
        description="judgment texts that mark a failed judge call; such rows are rejected, never trained on",
    )
    contradiction_prefixes: list[str] = Field(
        default_factory=lambda: list(polarity.DEFAULT_CONTRADICTION_PREFIXES),
        description="a negative judgment starting with one of these contradicts its polarity; it is reported",
    )
    quarantine_contradictions: bool = Field(
        default=False, description="true: move contradicting rows to rejects instead of only reporting them")

    @model_validator(mode="after")
    def _score_pair(self) -> "Polarity":
        if (self.score_column is None) != (self.score_threshold is None):
            raise ValueError("set both score_column and score_threshold, or neither")
        return self


class Source(Section):
    paths: list[str] = Field(
        min_length=1, description="files or glob patterns (JSONL, JSON array, Parquet, CSV, Arrow), relative to the "
        "pipeline file; with format='hf', also folders (a `datasets` save_to_disk folder, or hub-layout Parquet shards)")
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "arrow", "hf"] = Field(
        default="auto", description="file format; 'auto' decides by extension (.jsonl/.ndjson, .json, .parquet, .csv, "
        ".arrow); 'hf': Hugging Face `datasets` folders (save_to_disk Arrow files, or data/*.parquet shards)")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="canonical name -> column in the file, e.g. {'instruction': 'question'}, or a path into nested "
        "JSON: keys joined by '.', key[N] for element N, key[*] for every element (one triplet per element), e.g. "
        "{'response': 'completions[*].response'}; canonical names: "
        + ", ".join(CANONICAL_COLUMNS) + ", refined, score, messages (the conversation column)",
    )
    polarity: Polarity = Field(default_factory=Polarity, description="how a judgment becomes positive or negative")
    labeled: bool = Field(
        default=True, description="false: the rows carry no judgment yet and are sent to the judge")
    delimiter: str | None = Field(
        default=None, min_length=1, max_length=1,
        description="CSV field delimiter; default by extension: tab for .tsv/.tab, else a comma. CSV is read "
        "as RFC 4180 (double quotes, doubled to escape), never sniffed per file")

    @model_validator(mode="after")
    def _known_columns(self) -> "Source":
        from cut_core.data.ingest.sql import explode_array, is_path, parse_path

        allowed = set(CANONICAL_COLUMNS) | {"refined", "score", "id", "messages"}
        unknown = sorted(set(self.columns) - allowed)
        if unknown:
            raise ValueError(f"columns maps unknown canonical names {unknown}; allowed: {sorted(allowed)}")
        for name, spec in self.columns.items():
            if is_path(spec):
                if name == "messages":
                    raise ValueError(f"columns['messages'] names a top-level column, not a path ({spec!r})")
                parse_path(spec)
        explode_array(self.columns)
        return self


# The default of Ingestion.max_record_bytes (cut_core.data.ingest.sources reads it from here).
DEFAULT_MAX_RECORD_BYTES = 8 << 20


class Ingestion(Section):
    max_reject_rate: float = Field(
        default=0.10, ge=0.0, le=1.0,
        description="fail the ingest when rejected/rows_read exceeds this fraction (0..1)")
    max_record_bytes: int = Field(
        default=DEFAULT_MAX_RECORD_BYTES, ge=1024,
        description="a record (line, element or row) longer than this many bytes is rejected as 'oversized' "
        "without being parsed, which keeps memory bounded")
