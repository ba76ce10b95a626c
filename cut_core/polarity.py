"""The one polarity rule: how a judgment text becomes 'positive' or 'negative'.

Ingest (cut_core.ingest, in SQL) and every judge (cut_core.judges, in Python) decide polarity
with this rule, so the same text never gets two answers:

- no judgment (None) or a blank one: positive (a function judge says "nothing wrong" with None;
  the paper's data stores GPT-4's "perfect" as null);
- otherwise: strip leading whitespace and quoting/emphasis marks (LLM judges write '"Perfect."'
  or '**Perfect**'), lower-case, and a text that starts with one of the positive prefixes
  (lower-cased) is positive; any other text is negative.

A structured judge's verdict ("good" | "bad", `verdict_label` at the bottom) sets polarity
directly, and what it stores is checked to read the same way by the text rule.

`polarity_of` is the rule in Python, `positive_sql` the same rule as a DuckDB expression;
tests/test_polarity.py checks that they agree on the same texts through a real connection.
"""

from __future__ import annotations

from typing import Sequence

POSITIVE = "positive"
NEGATIVE = "negative"
DEFAULT_POSITIVE_PREFIXES = ("Perfect",)
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
    text = judgment.lstrip(LEADING_NOISE).lower()
    return POSITIVE if any(text.startswith(p.lower()) for p in positive_prefixes if p) else NEGATIVE


def positive_sql(judgment: str, positive_prefixes: Sequence[str]) -> str:
    """DuckDB boolean: the non-blank judgment expression `judgment` starts with a positive prefix
    after the leading noise (the caller handles NULL and blank judgments, which are positive)."""
    prefixes = [p.lower() for p in positive_prefixes if p]
    if not prefixes:
        return "false"
    stripped = f"lower(ltrim({judgment}, {_sql_lit(LEADING_NOISE)}))"
    return "(" + " OR ".join(f"starts_with({stripped}, {_sql_lit(p)})" for p in prefixes) + ")"


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
