"""The one polarity rule: how a judgment text becomes 'positive' or 'negative'.

Ingest (cut_core.data.ingest, in SQL) and every judge (cut_core.judge, in Python) decide polarity
with this rule, so the same text never gets two answers:

- no judgment (None) or a blank one: positive (a function judge says "nothing wrong" with None;
  the paper's data stores GPT-4's "perfect" as null);
- otherwise: strip leading whitespace and quoting/emphasis marks (LLM judges write '"Perfect."'
  or '**Perfect**'), lower-case, and a text that starts with one of the positive prefixes
  (lower-cased) is positive; any other text is negative.

Two neighbouring rules live here too, for the same reason (one answer per text):

- a failed call: a judgment whose whole text (whitespace aside) is a failure marker (`$ERROR$`,
  how the paper's data stored failed GPT-4 calls) is no judgment at all: a judge reports it as
  a failed call, ingest rejects the row (`is_failed_marker` / `failed_marker_sql`);
- a contradiction: a negative judgment that starts, after the same leading noise, with a
  contradiction prefix ("The response is perfect") (`contradicts` / `contradiction_sql`).

A structured judge's verdict ("good" | "bad", `verdict_label`) sets polarity directly,
and what it stores is checked to read the same way by the text rule.

Each rule is written in Python and as a DuckDB expression; tests/test_polarity.py checks that
the two agree on the same texts through a real DuckDB connection.
"""

from __future__ import annotations

from typing import Sequence

POSITIVE = "positive"
NEGATIVE = "negative"
DEFAULT_POSITIVE_PREFIXES = ("Perfect",)
DEFAULT_FAILED_MARKERS = ("$ERROR$",)
DEFAULT_CONTRADICTION_PREFIXES = ("The response is perfect",)
# Whitespace: a marker is compared with the judgment's whole text without it.
WS = " \t\n\r\f\v"
# Stripped from the front of a judgment before the prefix test.
LEADING_NOISE = " \t\r\n\"'`*_“”‘’«»"


def _sql_lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def is_blank(judgment: str | None) -> bool:
    return judgment is None or not judgment.strip()


def polarity_of(judgment: str | None, positive_prefixes: Sequence[str] = DEFAULT_POSITIVE_PREFIXES) -> str:
    """'positive' or 'negative' for a judgment text, by the rule in the module docstring."""
    if is_blank(judgment):
        return POSITIVE
    return POSITIVE if _starts(judgment, positive_prefixes) else NEGATIVE


def positive_sql(judgment: str, positive_prefixes: Sequence[str]) -> str:
    """DuckDB boolean: the non-blank judgment expression `judgment` starts with a positive prefix
    after the leading noise (the caller handles NULL and blank judgments, which are positive)."""
    return _starts_sql(judgment, positive_prefixes)


def _starts_sql(judgment: str, prefixes: Sequence[str]) -> str:
    lowered = [p.lower() for p in prefixes if p]
    if not lowered:
        return "false"
    # Only the head of the text is lowered (as long as the longest prefix; DuckDB's lower() maps
    # code point to code point, so the test is the same), and the leading noise is trimmed only
    # when the text starts with some: lowering and copying whole judgments cost ~1 CPU-s per
    # 1M rows of ingest.
    noise, n = _sql_lit(LEADING_NOISE), max(len(p) for p in lowered)
    head = (f"lower(CASE WHEN contains({noise}, left({judgment}, 1)) THEN left(ltrim({judgment}, {noise}), {n}) "
            f"ELSE left({judgment}, {n}) END)")
    return "(" + " OR ".join(f"starts_with({head}, {_sql_lit(p)})" for p in lowered) + ")"


def _starts(judgment: str, prefixes: Sequence[str]) -> bool:
    text = judgment.lstrip(LEADING_NOISE).lower()
    return any(text.startswith(p.lower()) for p in prefixes if p)


def is_failed_marker(judgment: str | None, markers: Sequence[str] = DEFAULT_FAILED_MARKERS) -> bool:
    """Whether a judgment's whole text, whitespace aside, is a failure marker."""
    if judgment is None:
        return False
    text = judgment.strip(WS)
    return bool(text) and text in {m.strip(WS) for m in markers if m.strip(WS)}


def failed_marker_sql(judgment: str, markers: Sequence[str]) -> str:
    """DuckDB boolean: `is_failed_marker` of the expression `judgment` (a cheap length test first)."""
    kept = [m.strip(WS) for m in markers if m.strip(WS)]
    if not kept:
        return "false"
    longest = max(len(m) for m in kept) + 64
    return (f"(length({judgment}) <= {longest} AND trim({judgment}, {_sql_lit(WS)}) "
            f"IN ({', '.join(map(_sql_lit, kept))}))")


def contradicts(judgment: str | None, prefixes: Sequence[str] = DEFAULT_CONTRADICTION_PREFIXES) -> bool:
    """Whether a (negative) judgment starts with a contradiction prefix after the leading noise."""
    return not is_blank(judgment) and _starts(judgment, prefixes)


def contradiction_sql(judgment: str, prefixes: Sequence[str]) -> str:
    """DuckDB boolean: `contradicts` of the non-NULL expression `judgment`."""
    return _starts_sql(judgment, prefixes)


def judge_rules(sources: Sequence) -> tuple[list[str], list[str]]:
    """(positive prefixes, failed markers) a judge applies: those of the sources declared
    `labeled=False` (the rows the judge is for), merged in order; without such a source, the
    defaults (the paper's "Perfect", `$ERROR$`)."""
    unlabeled = [s.polarity for s in sources if not s.labeled]
    prefixes = list(dict.fromkeys(p for pol in unlabeled for p in pol.positive_prefixes))
    markers = list(dict.fromkeys(m for pol in unlabeled for m in pol.failed_markers))
    return prefixes or list(DEFAULT_POSITIVE_PREFIXES), markers or list(DEFAULT_FAILED_MARKERS)


# ---------------------------------------------------------------- structured verdicts

# A structured judge (OpenAIJudge(response_format="json")) answers {"verdict", "judgment"}: the
# verdict decides polarity through this table, and the stored row must still read the same way by
# the text rule above, so that the warehouse's polarity column never disagrees with its judgment:
#   good -> positive, judgment stored as None (the paper's data stores a positive without text;
#           the objectives that need a positive's text use their defaults, contrast.py)
#   bad  -> negative, judgment stored as written; it must be non-blank (a negative without text
#           trains nothing) and must not read as positive by the prefix rule (a "bad" verdict whose
#           text says "Perfect..." contradicts itself: the call failed, it is no label).
VERDICTS = {"good": POSITIVE, "bad": NEGATIVE}


def verdict_label(verdict: object, judgment: object,
                  positive_prefixes: Sequence[str] = DEFAULT_POSITIVE_PREFIXES) -> tuple[str | None, str]:
    """(stored judgment, polarity) of a structured verdict, or ValueError saying why it is no label."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r} is not one of {sorted(VERDICTS)}")
    if not isinstance(judgment, str):
        raise ValueError(f"judgment is {type(judgment).__name__}, expected a string")
    if VERDICTS[verdict] == POSITIVE:
        return None, POSITIVE
    if is_blank(judgment):
        raise ValueError("verdict 'bad' with a blank judgment (a negative needs its text)")
    if polarity_of(judgment, positive_prefixes) == POSITIVE:
        raise ValueError("verdict 'bad' but the judgment reads as positive by the prefix rule "
                         f"(starts with one of {list(positive_prefixes)}): a self-contradicting reply")
    return judgment.strip(), NEGATIVE
