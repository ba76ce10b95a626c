"""The polarity rules decide a text the same way in Python (judges) and in DuckDB (ingest)."""

from __future__ import annotations

import duckdb
import pytest

from cut_core.data import polarity
from cut_core.judge import FunctionJudge

TEXTS = [
    "Perfect.", '"Perfect."', "**perfect** answer", "  \u201cPerfect\u201d", "The answer is wrong.",
    "$ERROR$", "  $ERROR$\n", "$ERROR$ and more", "error", "The response is perfect, but no.",
    '"The response is perfect" says nobody', "**The response is perfect**", "the RESPONSE is perfect",
    "Nearly perfect", "",
    # the SQL lowers only the head of the text, as long as the longest prefix: around that edge
    "Perfec", "Perfect", "PERFECTLY fine", "\u00ab**  _perfect_", "\u00c9Perfect", "\u201c", "*",
    "\u0130Perfect", "\u212aperfect", "the response is perfec", "  *The Response Is Perfect*",
]
PREFIXES = ["Perfect"]
MARKERS = ["$ERROR$"]
CONTRA = list(polarity.DEFAULT_CONTRADICTION_PREFIXES)


def _sql(expr: str, text: str) -> bool:
    con = duckdb.connect()
    try:
        return bool(con.execute(f"SELECT {expr} FROM (SELECT ?::VARCHAR AS judgment)", [text]).fetchall()[0][0])
    finally:
        con.close()


@pytest.mark.parametrize("text", TEXTS)
def test_python_and_sql_agree(text):
    if text.strip():
        assert (polarity.polarity_of(text, PREFIXES) == polarity.POSITIVE) == _sql(
            polarity.positive_sql("judgment", PREFIXES), text)
        assert polarity.contradicts(text, CONTRA) == _sql(polarity.contradiction_sql("judgment", CONTRA), text)
    assert polarity.is_failed_marker(text, MARKERS) == _sql(polarity.failed_marker_sql("judgment", MARKERS), text)


def test_contradiction_strips_quotes_and_emphasis_like_the_positive_rule():
    assert polarity.contradicts('"The response is perfect." Yet it is wrong.')
    assert polarity.contradicts("**The response is perfect**")
    assert not polarity.contradicts("The answer is wrong.")


def test_a_judge_reports_a_marker_as_a_failed_call_and_ingest_rejects_it_alike():
    judge = FunctionJudge(lambda i, r: "  $ERROR$ ", failed_markers=MARKERS)
    (result,) = judge.judge_batch([("q", "a")])
    assert result.status == "failed"
    assert _sql(polarity.failed_marker_sql("judgment", MARKERS), "  $ERROR$ ")


def test_judge_rules_merge_unlabeled_sources_only():
    from cut_core.dsl import Polarity, Source

    sources = [Source(paths=["a.jsonl"], labeled=False, polarity=Polarity(positive_prefixes=["Good", "Perfect"])),
               Source(paths=["b.jsonl"], labeled=True, polarity=Polarity(positive_prefixes=["Fine"])),
               Source(paths=["c.jsonl"], labeled=False, polarity=Polarity(positive_prefixes=["Perfect"],
                                                                         failed_markers=["N/A"]))]
    assert polarity.judge_rules(sources) == (["Good", "Perfect"], ["$ERROR$", "N/A"])
    assert polarity.judge_rules([]) == (["Perfect"], ["$ERROR$"])
