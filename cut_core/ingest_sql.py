"""The validation query of cut_core.ingest: one chunk of records in, one checked row per record out.

`validation_sql(source)` checks one chunk `_ingest_chunk(row_number BIGINT, text VARCHAR,
pre_reason VARCHAR, pre_detail VARCHAR, pre_raw VARCHAR)`: `text` is one record as JSON;
`pre_reason` is set (and text NULL) where the reader already rejected the record (invalid_utf8,
invalid_encoding, malformed_csv, oversized, wrong_type for a BINARY Parquet value that is not
UTF-8), with its detail and raw text. It yields one row per input row:

    row_number, reason, detail, raw,                                   -- reason NULL: a good row
    instruction, response, judgment, polarity, refined, score, contradiction, -- good rows only
    id                                                                 -- good rows: the content hash

`raw` is the record's text for rejected rows (a duplicate's comes from the chunk itself). The id is
warehouse.content_key_sql (sha256 in DuckDB, the same bytes as warehouse.content_key), the
polarity is polarity.positive_sql (the rule judges use). Duplicates are found by the warehouse
(warehouse.add_checked), which owns every statement on `triplets`.
"""

from __future__ import annotations

import re

from cut_core import dsl
from cut_core.polarity import WS, contradiction_sql, failed_marker_sql, positive_sql
from cut_core.warehouse import content_key_sql



def lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _pointer(key: str) -> str:
    """JSON pointer for a top-level key (handles '/', '~', spaces and dots in column names)."""
    return "/" + key.replace("~", "~0").replace("/", "~1")


def _json_kind(type_expr: str) -> str:
    """SQL naming a json_type() result the way a person would ('a number', 'an array')."""
    return (f"CASE WHEN {type_expr} IN ('UBIGINT', 'BIGINT', 'DOUBLE') THEN 'a number' "
            f"WHEN {type_expr} IN ('ARRAY', 'OBJECT') THEN 'an ' || lower({type_expr}) "
            f"WHEN {type_expr} = 'VARCHAR' THEN 'a string' ELSE 'a ' || lower({type_expr}) END")


def validation_sql(source: dsl.Source) -> str:
    """The query that checks `_ingest_chunk(row_number, text)`; see the module docstring.

    Every expression that only matters for some rows sits under a CASE, which DuckDB evaluates
    only for the rows that take that branch: the good path parses each line three times
    (json_valid, json_type, json_extract_string; one parse per call, all fields at once).
    """
    cols, pol = source.columns, source.polarity
    fields: dict[str, list[str]] = {
        "instruction": [cols.get("instruction", "instruction")],
        "input": [cols.get("input", "input")],
        # Alpaca files call the response `output`; an explicit mapping replaces both names.
        "response": [cols["response"]] if "response" in cols else ["response", "output"],
        "judgment": [cols.get("judgment", "judgment")],
        "refined": [cols.get("refined", "refined")],
    }
    if pol.score_column:
        fields["score"] = [cols.get(pol.score_column, pol.score_column)]
    keys = [k for names in fields.values() for k in names]
    paths = "[" + ", ".join(lit(_pointer(k)) for k in keys) + "]"
    type_paths = "['$', " + paths[1:]

    def pick(name: str) -> tuple[str, str, str]:
        """(type, value, key-name expression) of a field, the first present of its names."""
        idx = [keys.index(k) + 1 for k in fields[name]]
        if len(idx) == 1:
            return f"ty[{idx[0] + 1}]", f"v[{idx[0]}]", lit(fields[name][0])
        t = "COALESCE(" + ", ".join(f"ty[{i + 1}]" for i in idx) + ")"
        v = "CASE " + " ".join(f"WHEN ty[{i + 1}] IS NOT NULL THEN v[{i}]" for i in idx) + " END"
        k = "CASE " + " ".join(f"WHEN ty[{i + 1}] IS NOT NULL THEN {lit(fields[name][j])}"
                               for j, i in enumerate(idx)) + f" ELSE {lit(fields[name][0])} END"
        return t, v, k

    picked = []
    for name in fields:
        t, v, k = pick(name)
        picked.append(f"{t} AS {name}_t, {v} AS {name}_v, {k} AS {name}_k")
    text_fields = ["instruction", "input", "response", "judgment", "refined"]
    bad_text = [f"({n}_t IS NOT NULL AND {n}_t NOT IN ('VARCHAR', 'NULL'))" for n in text_fields]
    wrong = [f"CASE WHEN {b} THEN {n}_k || ' is ' || {_json_kind(n + '_t')} || ', expected a string' END"
             for b, n in zip(bad_text, text_fields)]
    if pol.score_column:
        bad_score = ("(score_t IS NOT NULL AND score_t NOT IN ('UBIGINT', 'BIGINT', 'DOUBLE', 'NULL') AND "
                     "NOT (score_t = 'VARCHAR' AND TRY_CAST(score_v AS DOUBLE) IS NOT NULL))")
        bad_text.append(bad_score)
        wrong.append(f"CASE WHEN {bad_score} THEN score_k || ' is ' || {_json_kind('score_t')} || ', expected a number' END")
        score = "TRY_CAST(score_v AS DOUBLE)"
        threshold = repr(float(pol.score_threshold))
    else:
        score, threshold = "NULL::DOUBLE", "NULL"

    is_positive_text = positive_sql("judgment", pol.positive_prefixes)
    says_perfect = contradiction_sql("judgment", pol.contradiction_prefixes)
    is_failed = failed_marker_sql("judgment", pol.failed_markers)
    labeled = "true" if source.labeled else "false"
    # blank: no non-whitespace character; the regex runs only when the first byte is not already
    # printable, which is almost never, instead of on every field of every row
    blank = "(CASE WHEN ascii({0}) > 32 THEN false ELSE NOT regexp_matches({0}, '\\S') END)"

    return f"""
WITH parsed AS (
    SELECT row_number, text, pre_detail, pre_raw,
           CASE WHEN pre_reason IS NOT NULL THEN pre_reason
                WHEN text IS NULL THEN 'invalid_utf8'
                WHEN NOT json_valid(text) THEN
                     CASE WHEN {blank.format('text')} THEN 'blank' ELSE 'malformed_json' END
           END AS early
    FROM _ingest_chunk
), extracted AS (
    SELECT row_number, text, pre_detail, pre_raw, early,
           CASE WHEN early IS NULL THEN json_type(text, {type_paths}) END AS ty,
           CASE WHEN early IS NULL THEN json_extract_string(text, {paths}) END AS v
    FROM parsed
), fields AS (
    SELECT row_number, text, pre_detail, pre_raw, early, ty[1] AS top, {', '.join(picked)}, {score} AS score
    FROM extracted
), labelled AS (
    SELECT *,
           -- a judgment that is absent (no key) and no score: the row has not been judged yet
           {labeled} AND (judgment_t IS NOT NULL OR score IS NOT NULL) AS is_labeled,
           CASE WHEN {labeled} AND judgment_v IS NOT NULL AND NOT {blank.format('judgment_v')}
                THEN judgment_v END AS judgment
    FROM fields
), classified AS (
    SELECT *,
           CASE WHEN NOT is_labeled THEN NULL
                WHEN score >= {threshold} THEN 'positive'
                WHEN judgment IS NULL THEN CASE WHEN score IS NULL THEN 'positive' ELSE 'negative' END
                WHEN {is_positive_text} THEN 'positive'
                ELSE 'negative' END AS polarity
    FROM labelled
), checked AS (
    SELECT *,
           COALESCE(polarity = 'negative' AND judgment IS NOT NULL AND {says_perfect}, false) AS contradiction,
           CASE WHEN early IS NOT NULL THEN early
                WHEN top <> 'OBJECT' THEN 'not_an_object'
                WHEN {' OR '.join(bad_text)} THEN 'wrong_type'
                WHEN instruction_v IS NULL OR {blank.format('instruction_v')} THEN 'missing_instruction'
                WHEN response_v IS NULL OR {blank.format('response_v')} THEN 'missing_response'
                WHEN is_labeled AND judgment IS NOT NULL AND {is_failed} THEN 'failed_judgment'
           END AS reason0
    FROM classified
), final AS (
    SELECT *,
           CASE WHEN reason0 IS NULL AND contradiction AND {str(pol.quarantine_contradictions).lower()}
                THEN 'contradiction' ELSE reason0 END AS reason,
           CASE WHEN input_v IS NOT NULL AND NOT {blank.format('input_v')}
                THEN instruction_v || chr(10) || input_v ELSE instruction_v END AS instruction_full
    FROM checked
)
SELECT row_number, reason,
       CASE WHEN pre_detail IS NOT NULL AND reason = early THEN pre_detail ELSE CASE reason
            WHEN 'not_an_object' THEN 'the record is ' || {_json_kind('top')} || ', not an object'
            WHEN 'wrong_type' THEN concat_ws('; ', {', '.join(wrong)})
            WHEN 'missing_instruction' THEN CASE WHEN instruction_t IS NULL THEN 'no field ' || instruction_k
                 ELSE 'field ' || instruction_k || ' is null or blank' END
            WHEN 'missing_response' THEN CASE WHEN response_t IS NULL THEN 'no field ' || response_k
                 ELSE 'field ' || response_k || ' is null or blank' END
            WHEN 'failed_judgment' THEN 'field ' || judgment_k || ' is the failed-judge marker '
                 || trim(judgment, {lit(WS)})
            WHEN 'contradiction' THEN 'negative judgment that says the response is perfect: ' || left(judgment, 80)
       END END AS detail,
       -- rtrim over every good row would cost more than the JSON parse: rejects only
       CASE WHEN reason IS NULL OR reason = 'blank' THEN NULL WHEN pre_raw IS NOT NULL THEN pre_raw
            ELSE rtrim(text, chr(13) || chr(10)) END AS raw,
       CASE WHEN reason IS NULL THEN instruction_full END AS instruction,
       CASE WHEN reason IS NULL THEN response_v END AS response,
       CASE WHEN reason IS NULL THEN judgment END AS judgment,
       CASE WHEN reason IS NULL THEN polarity END AS polarity,
       CASE WHEN reason IS NULL THEN refined_v END AS refined,
       CASE WHEN reason IS NULL THEN score END AS score,
       CASE WHEN reason IS NULL THEN contradiction END AS contradiction,
       CASE WHEN reason IS NULL THEN {content_key_sql("instruction_full", "response_v", "judgment")} END AS id
FROM final
"""
