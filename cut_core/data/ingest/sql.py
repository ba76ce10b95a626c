"""The validation query of cut_core.data.ingest (run.py): one chunk of records in, one checked row per record out.

`validation_sql(source)` checks one chunk `_ingest_chunk(row_number BIGINT, text VARCHAR,
pre_reason VARCHAR, pre_detail VARCHAR, pre_raw VARCHAR)`: `text` is one record as JSON;
`pre_reason` is set (and text NULL) where the reader already rejected the record (invalid_utf8,
invalid_encoding, malformed_csv, oversized, wrong_type for a BINARY Parquet value that is not
UTF-8), with its detail and raw text. It yields one row per input row:

    unit, row_number, element, reason, detail, raw,                    -- reason NULL: a good row
    instruction, context, response, judgment, polarity, refined, score, contradiction, -- good rows only
    id                                                                 -- good rows: the content hash

A column map may name paths into nested JSON (parse_path); one array may be exploded ([*]): a
row then gives one unit per element (`element`, 0-based; `unit` numbers the units of the chunk),
and a row whose array is absent or empty one unit rejected as empty_array. Without [*], unit =
row_number and element is NULL.

`raw` is the record's text for rejected rows (a duplicate's comes from the chunk itself). The id is
warehouse.triplet_id_sql (md5 in DuckDB, the same value as warehouse.triplet_id), the
polarity is polarity.positive_sql (the rule judges use). Duplicates are found by the warehouse
(warehouse.add_checked), which owns every statement on `triplets`.
"""

from __future__ import annotations

import re

from cut_core import dsl
from cut_core.data.polarity import WS, contradiction_sql, failed_marker_sql, positive_sql
from cut_core.data.warehouse import triplet_id_sql



def lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _pointer(key: str) -> str:
    """JSON pointer for a top-level key (handles '/', '~', spaces and dots in column names)."""
    return "/" + key.replace("~", "~0").replace("/", "~1")


# ---------------------------------------------------------------- column maps with paths

# A column map value is a column name or a path into nested JSON: keys joined by '.', a key
# followed by [N] (element N, 0-based) or [*] (every element: the row is exploded, one unit per
# element). e.g. "completions[*].response", "meta.source", "turns[0].text".
_SEGMENT = re.compile(r"([^.\[\]]+)((?:\[(?:\*|\d+)\])*)")
# Where a messages row's stored turns travel from the reader to this query (ingest.conversations).
CONTEXT_KEY = "__cut_context__"
# The reason validation_sql(context=False) gives a conversation row: the reader rewrites it and
# checks it again; it never reaches the warehouse.
CONVERSATION = "_conversation"


def is_path(spec: str) -> bool:
    return "." in spec or "[" in spec


def parse_path(spec: str) -> tuple[str | None, str]:
    """(pointer of the exploded array or None, pointer of the value: into the array's element
    when exploded, else into the row). Raises ValueError on a malformed path or two [*]."""
    pos, parts, explode_at = 0, [], None
    for seg in spec.split("."):
        m = _SEGMENT.fullmatch(seg)
        if not m:
            raise ValueError(f"column path {spec!r}: {seg!r} is not a key, key[N] or key[*]")
        parts.append(m.group(1))
        for idx in re.findall(r"\[(\*|\d+)\]", m.group(2)):
            if idx == "*":
                if explode_at is not None:
                    raise ValueError(f"column path {spec!r} has more than one [*]; one array is exploded")
                explode_at = len(parts)
                parts.append("*")
            else:
                parts.append(idx)
        pos += 1
    ptr = lambda keys: "".join(_pointer(k) for k in keys)
    if explode_at is None:
        return None, ptr(parts)
    return ptr(parts[:explode_at]), (ptr(parts[explode_at + 1:]) or "$")


def explode_array(columns: dict[str, str]) -> str | None:
    """The pointer of the array a column map explodes ([*]), or None; all [*] paths must name
    the same array (ValueError otherwise)."""
    arrays = {parse_path(v)[0] for v in columns.values() if is_path(v)} - {None}
    if len(arrays) > 1:
        raise ValueError(f"column paths explode different arrays ({sorted(arrays)}); [*] may name one array")
    return arrays.pop() if arrays else None


def _json_kind(type_expr: str) -> str:
    """SQL naming a json_type() result the way a person would ('a number', 'an array')."""
    return (f"CASE WHEN {type_expr} IN ('UBIGINT', 'BIGINT', 'DOUBLE') THEN 'a number' "
            f"WHEN {type_expr} IN ('ARRAY', 'OBJECT') THEN 'an ' || lower({type_expr}) "
            f"WHEN {type_expr} = 'VARCHAR' THEN 'a string' ELSE 'a ' || lower({type_expr}) END")


def validation_sql(source: dsl.Source, *, context: bool = False) -> str:
    """The query that checks `_ingest_chunk(row_number, text)`; see the module docstring.

    context=False: a conversation row (a `messages` array, or `prompt` and `completion` arrays)
    gets the reason CONVERSATION; the reader rewrites those rows (ingest.conversations) and checks the
    chunk again with context=True, which reads their stored turns (CONTEXT_KEY) into `context`,
    where it enters the id (warehouse.triplet_id_sql).

    Every expression that only matters for some rows sits under a CASE, which DuckDB evaluates
    only for the rows that take that branch: the good path parses each line three times
    (json_valid, json_type, json_extract_string; one parse per call, all fields at once).
    """
    cols, pol = source.columns, source.polarity
    names: dict[str, list[str]] = {
        "instruction": [cols.get("instruction", "instruction")],
        "input": [cols.get("input", "input")],
        # Alpaca files call the response `output`; an explicit mapping replaces both names.
        "response": [cols["response"]] if "response" in cols else ["response", "output"],
        "judgment": [cols.get("judgment", "judgment")],
        "refined": [cols.get("refined", "refined")],
    }
    if pol.score_column:
        names["score"] = [cols.get(pol.score_column, pol.score_column)]
    if context:
        names["context"] = [CONTEXT_KEY]
    array = explode_array(cols)
    # name -> candidates (label, scope, pointer); scope 'row' reads the record, 'el' the exploded
    # array's element. A dotted name is first a literal column (as before paths existed), then a path.
    fields: dict[str, list[tuple[str, str, str]]] = {}
    for name, specs in names.items():
        cands = []
        for spec in specs:
            if not is_path(spec):
                cands.append((spec, "row", _pointer(spec)))
                continue
            arr, ptr = parse_path(spec)
            if arr is None and "[" not in spec:
                cands.append((spec, "row", _pointer(spec)))
            cands.append((spec, "row" if arr is None else "el", ptr))
        fields[name] = cands
    row_keys = [c for cands in fields.values() for c in cands if c[1] == "row"]
    el_keys = [c for cands in fields.values() for c in cands if c[1] == "el"]
    paths = "[" + ", ".join(lit(p) for _, _, p in row_keys) + "]"
    # conversation keys: typed (one more path in a parse that happens anyway), never extracted
    conv_keys = [] if context else [cols.get("messages", "messages"), "prompt", "completion"]
    type_paths = "[" + ", ".join(["'$'"] + [lit(p) for _, _, p in row_keys] + [lit(_pointer(k)) for k in conv_keys]) + "]"
    n = len(row_keys) + 1
    is_conversation = (f"(ty[{n + 1}] = 'ARRAY' OR (ty[{n + 2}] = 'ARRAY' AND ty[{n + 3}] = 'ARRAY'))"
                       if conv_keys else "false")
    el_paths = "[" + ", ".join(lit(p) for _, _, p in el_keys) + "]"

    def pick(name: str) -> tuple[str, str, str]:
        """(type, value, key-name expression) of a field, the first present of its candidates."""
        refs = []
        for c in fields[name]:
            if c[1] == "row":
                i = row_keys.index(c) + 1
                refs.append((f"ty[{i + 1}]", f"v[{i}]", c[0]))
            else:
                i = el_keys.index(c) + 1
                refs.append((f"ety[{i}]", f"ev[{i}]", c[0]))
        if len(refs) == 1:
            return refs[0][0], refs[0][1], lit(refs[0][2])
        t = "COALESCE(" + ", ".join(r[0] for r in refs) + ")"
        v = "CASE " + " ".join(f"WHEN {r[0]} IS NOT NULL THEN {r[1]}" for r in refs) + " END"
        k = "CASE " + " ".join(f"WHEN {r[0]} IS NOT NULL THEN {lit(r[2])}" for r in refs) + f" ELSE {lit(refs[0][2])} END"
        return t, v, k

    picked = []
    for name in fields:
        t, v, k = pick(name)
        picked.append(f"{t} AS {name}_t, {v} AS {name}_v, {k} AS {name}_k")
    context_v = "context_v" if context else None
    if array is None:
        units = """units AS (
    SELECT row_number AS unit, row_number, NULL::INTEGER AS element, text, pre_detail, pre_raw, early,
           NULL::VARCHAR AS arr_t, NULL::VARCHAR AS el
    FROM parsed
)"""
        el_extract = "NULL::VARCHAR[] AS ety, NULL::VARCHAR[] AS ev"
        empty_array = "false"
    else:
        # one unit per element of the array; a row whose array is absent, empty or not an array
        # stays one unit (element NULL), rejected as empty_array
        units = f"""arrays AS (
    SELECT *, CASE WHEN early IS NULL THEN json_type(text, {lit(array)}) END AS arr_t,
           CASE WHEN early IS NULL AND json_type(text, {lit(array)}) = 'ARRAY'
                THEN json_array_length(text, {lit(array)}) ELSE 0 END AS arr_n
    FROM parsed
), exploded AS (
    SELECT row_number, text, pre_detail, pre_raw, early, arr_t,
           unnest(CASE WHEN arr_n > 0 THEN range(arr_n::BIGINT) ELSE [NULL::BIGINT] END) AS element
    FROM arrays
), units AS (
    SELECT row_number() OVER (ORDER BY row_number, element) AS unit, row_number, element::INTEGER AS element,
           text, pre_detail, pre_raw, early, arr_t,
           CASE WHEN element IS NOT NULL THEN json_extract(text, concat({lit(array)}, '/', element))::VARCHAR END AS el
    FROM exploded
)"""
        el_extract = (f"CASE WHEN el IS NOT NULL THEN json_type(el, {el_paths}) END AS ety, "
                      f"CASE WHEN el IS NOT NULL THEN json_extract_string(el, {el_paths}) END AS ev")
        empty_array = "element IS NULL"
        array_label = lit(next(spec for spec in cols.values() if is_path(spec) and "[*]" in spec).split("[*]")[0])
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

    id_sql = triplet_id_sql("instruction_full", "response_v", "judgment", context_v)
    empty_detail = ("NULL" if array is None else
                    f"CASE WHEN arr_t IS NULL THEN 'no array ' || {array_label} || ' to explode ([*])' "
                    f"WHEN arr_t = 'ARRAY' THEN 'array ' || {array_label} || ' is empty: no element to explode' "
                    f"ELSE 'field ' || {array_label} || ' is ' || {_json_kind('arr_t')} || ', expected an array to explode ([*])' END")
    return f"""
WITH parsed AS (
    SELECT row_number, text, pre_detail, pre_raw,
           CASE WHEN pre_reason IS NOT NULL THEN pre_reason
                WHEN text IS NULL THEN 'invalid_utf8'
                WHEN NOT json_valid(text) THEN
                     CASE WHEN {blank.format('text')} THEN 'blank' ELSE 'malformed_json' END
           END AS early
    FROM _ingest_chunk
), {units}, extracted AS (
    SELECT unit, row_number, element, text, pre_detail, pre_raw, early, arr_t,
           CASE WHEN early IS NULL THEN json_type(text, {type_paths}) END AS ty,
           CASE WHEN early IS NULL THEN json_extract_string(text, {paths}) END AS v,
           {el_extract}
    FROM units
), fields AS (
    SELECT unit, row_number, element, text, pre_detail, pre_raw, early, arr_t, ty[1] AS top, {', '.join(picked)},
           {score} AS score, COALESCE({is_conversation}, false) AS is_conversation
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
                WHEN is_conversation THEN {lit(CONVERSATION)}
                WHEN {empty_array} THEN 'empty_array'
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
SELECT unit, row_number, element, reason,
       CASE WHEN pre_detail IS NOT NULL AND reason = early THEN pre_detail ELSE CASE reason
            WHEN 'not_an_object' THEN 'the record is ' || {_json_kind('top')} || ', not an object'
            WHEN 'empty_array' THEN {empty_detail}
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
       CASE WHEN reason IS NULL THEN {context_v or "NULL::VARCHAR"} END AS context,
       CASE WHEN reason IS NULL THEN response_v END AS response,
       CASE WHEN reason IS NULL THEN judgment END AS judgment,
       CASE WHEN reason IS NULL THEN polarity END AS polarity,
       CASE WHEN reason IS NULL THEN refined_v END AS refined,
       CASE WHEN reason IS NULL THEN score END AS score,
       CASE WHEN reason IS NULL THEN contradiction END AS contradiction,
       CASE WHEN reason IS NULL THEN {id_sql} END AS id
FROM final
"""
