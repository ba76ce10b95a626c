"""What an ingest run reports: the reject reasons, the errors it raises, the per-file and per-run
counts, and the reject-rate gate over them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Sequence

REASONS = {
    "invalid_utf8": "the line is not valid UTF-8",
    "malformed_json": "the line (or the whole JSON-array file) is not valid JSON",
    "not_an_object": "the record is valid JSON but not an object",
    "wrong_type": "a canonical field has the wrong JSON type (texts must be strings, score a number)",
    "missing_instruction": "the instruction is missing, null or blank",
    "missing_response": "the response is missing, null or blank",
    "failed_judgment": "the judgment is a failed-judge marker such as $ERROR$",
    "contradiction": "a negative judgment that says the response is perfect (quarantine_contradictions)",
    "duplicate": "same (instruction, response, judgment) as an earlier row or an existing triplet",
    "malformed_csv": "a CSV record DuckDB could not split into the header's columns",
    "invalid_encoding": "the bytes are not valid in the UTF-16/32 encoding the file's byte-order mark names",
    "oversized": "the record is longer than the maximum record size (Ingestion.max_record_bytes)",
    "empty_array": "the array a column map explodes ([*]) is absent, empty or not an array",
    "malformed_messages": "a `messages` (or prompt/completion) conversation that does not end with the assistant "
                          "turn answering a user turn",
}


class IngestError(RuntimeError):
    """A source that cannot be read at all (no file matches, unknown format, unreadable file)."""


class RejectRateExceeded(IngestError):
    """More rows were rejected than `max_reject_rate` allows.

    Accepted rows and rejects are committed before this is raised (nothing is lost). `report` is
    the report as a dict (IngestReport.to_dict()), `ingest_report` the object, `rate` the
    rejected fraction the gate judged.
    """

    def __init__(self, report: "IngestReport", max_reject_rate: float):
        self.ingest_report = report
        self.report = report.to_dict()      # the shape flows and the CLI print
        self.max_reject_rate = max_reject_rate
        rows, rejected = report.gate_counts()
        self.rate = rejected / rows if rows else 0.0
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(report.rejected_by_reason.items())) or "none"
        super().__init__(
            f"ingest rejected {rejected} of {rows} rows ({self.rate:.1%}), above max_reject_rate "
            f"{max_reject_rate:.1%}; by reason: {reasons}. The {report.accepted} accepted rows and the "
            f"rejects are committed; inspect them with: SELECT reason, source, row_number, detail "
            f"FROM rejects WHERE batch = '{report.batch}'")


# ---------------------------------------------------------------- reports

@dataclass
class FileReport:
    """What one file contributed. A skipped file (same digest already ingested) read nothing;
    `earlier` then holds the figures recorded when it was ingested."""

    path: str
    format: str
    digest: str
    rows_read: int = 0
    accepted: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    positives: int = 0
    negatives: int = 0
    unlabeled: int = 0
    contradictions: int = 0
    blank_lines: int = 0
    skipped: bool = False
    earlier: dict | None = None
    # "digest" (hashing the file), "check" (reading, validating, hashing ids), "write" (dedupe,
    # inserts, commit)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class IngestReport:
    """Counts of one ingest run over one or more sources; the sums are properties over `files`."""

    batch: str
    files: list[FileReport] = field(default_factory=list)

    def _sum(self, name: str) -> int:
        return sum(getattr(f, name) for f in self.files)

    rows_read = property(lambda self: self._sum("rows_read"))
    accepted = property(lambda self: self._sum("accepted"))
    rejected = property(lambda self: self._sum("rejected"))
    positives = property(lambda self: self._sum("positives"))
    negatives = property(lambda self: self._sum("negatives"))
    unlabeled = property(lambda self: self._sum("unlabeled"))
    contradictions = property(lambda self: self._sum("contradictions"))
    blank_lines = property(lambda self: self._sum("blank_lines"))

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.files:
            for reason, n in f.rejected_by_reason.items():
                out[reason] = out.get(reason, 0) + n
        return dict(sorted(out.items()))

    @property
    def skipped_files(self) -> list[str]:
        return [f.path for f in self.files if f.skipped]

    def gate_counts(self) -> tuple[int, int]:
        """(rows, rejected) the reject-rate gate judges: this run's rows plus, for files skipped
        as already ingested, the figures recorded then, so re-running a file that failed the gate
        fails again instead of passing because nothing new was read."""
        rows, rejected = self.rows_read, self.rejected
        for f in self.files:
            if f.skipped and f.earlier:
                rows += f.earlier["rows_read"]
                rejected += f.earlier["rejected"]
        return rows, rejected

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "rows_read": self.rows_read,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "rejected_by_reason": self.rejected_by_reason,
            "positives": self.positives,
            "negatives": self.negatives,
            "unlabeled": self.unlabeled,
            "contradictions": self.contradictions,
            "blank_lines": self.blank_lines,
            "skipped_files": self.skipped_files,
            "files": [asdict(f) for f in self.files],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "IngestReport":
        return cls(batch=data["batch"], files=[FileReport(**f) for f in data["files"]])

    @classmethod
    def combine(cls, reports: Sequence["IngestReport"], batch: str | None = None) -> "IngestReport":
        batch = batch or (reports[0].batch if reports else default_batch())
        return cls(batch=batch, files=[f for r in reports for f in r.files])


def check_reject_rate(report: IngestReport, max_reject_rate: float) -> None:
    """Raise RejectRateExceeded when the rejected fraction is above `max_reject_rate` (0..1)."""
    rows, rejected = report.gate_counts()
    if rows and rejected / rows > max_reject_rate:
        raise RejectRateExceeded(report, max_reject_rate)


def default_batch() -> str:
    return "ingest-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
