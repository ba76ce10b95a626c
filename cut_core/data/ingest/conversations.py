"""Conversations -> flat records: a `messages` list, or TRL's conversational `prompt` +
`completion` lists, becomes instruction (the turns before the answer, as text), response (the
last, assistant turn) and the turns themselves under sql.CONTEXT_KEY (for `triplets.context`);
a conversation that cannot be a triplet is rejected with its reason."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import pyarrow as pa

from cut_core import dsl
from cut_core.data import templates
from cut_core.data.ingest.chunks import CHUNK_SCHEMA
from cut_core.data.ingest.sql import CONTEXT_KEY
from cut_core.data.polarity import WS

def _json_kind(value) -> str:
    return {list: "an array", dict: "an object", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _conversation(rec: dict, msgs_key: str, instr_key: str, resp_key: str) -> tuple[dict | None, tuple | None]:
    """A `messages` record (or TRL's conversational prompt/completion) -> (flat record, None), or
    (None, (reason, detail)) when it cannot be one, or (None, None) when it is not a conversation."""
    if isinstance(rec.get(msgs_key), list):
        turns, where, drop = rec[msgs_key], msgs_key, (msgs_key,)
    elif isinstance(rec.get("prompt"), list) and isinstance(rec.get("completion"), list):
        turns, where, drop = rec["prompt"] + rec["completion"], "prompt + completion", ("prompt", "completion")
    else:
        return None, None
    if instr_key in rec or resp_key in rec:
        return None, ("malformed_messages", f"the record has both {where} and a {instr_key!r}/{resp_key!r} field; "
                      "a row is a conversation or an instruction, not both")
    for k, t in enumerate(turns):
        if not isinstance(t, dict):
            return None, ("wrong_type", f"{where}[{k}] is {_json_kind(t)}, expected an object {{role, content}}")
        for key in ("role", "content"):
            if not isinstance(t.get(key), str):
                got = "absent" if key not in t else _json_kind(t[key])
                return None, ("wrong_type", f"{where}[{k}].{key} is {got}, expected a string")
    last = max((k for k, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        return None, ("missing_response", f"{where} has no assistant turn")
    if last != len(turns) - 1:
        return None, ("malformed_messages", f"{where} has {len(turns) - 1 - last} turn(s) after its last assistant "
                      f"turn ({where}[{last}]); the judged response is the conversation's last turn")
    if last == 0 or turns[last - 1]["role"] != "user":
        before = "nothing" if last == 0 else f"a {turns[last - 1]['role']!r} turn"
        return None, ("missing_instruction", f"{where}[{last}] (the response) follows {before}, not a user turn")
    prompt = turns[:last]
    if not turns[last]["content"].strip(WS):
        return None, ("missing_response", f"{where}[{last}].content (the response) is blank")
    if not prompt[-1]["content"].strip(WS):
        return None, ("missing_instruction", f"{where}[{last - 1}].content (the user turn) is blank")
    out = {k: v for k, v in rec.items() if k not in drop}
    out[instr_key] = templates.conversation_text(prompt)
    out[resp_key] = turns[last]["content"]
    context = templates.context_json(prompt)
    if context is not None:
        out[CONTEXT_KEY] = context
    return out, None


def rewrite_conversations(chunk: pa.Table, source: dsl.Source, row_numbers: Sequence[int]) -> pa.Table:
    """Rewrite the chunk's conversation rows (a `messages` list, or TRL's conversational `prompt`
    and `completion` lists; the validation query names them by `row_numbers`) into flat records:
    the response is the last (assistant) turn, the instruction the turns before it as text, their
    turns under sql.CONTEXT_KEY. A conversation that cannot be a triplet is rejected here,
    with its reason. The record as read stays in pre_raw, so a reject shows it."""
    cols = source.columns
    msgs_key = cols.get("messages", "messages")
    rows = np.searchsorted(chunk.column("row_number").to_numpy(), np.asarray(row_numbers, np.int64))
    text = chunk.column("text")
    instr_key = cols.get("instruction", "instruction")
    resp_key = cols.get("response", "response")
    texts = text.to_pylist()
    reasons = chunk.column("pre_reason").to_pylist()
    details = chunk.column("pre_detail").to_pylist()
    raws = chunk.column("pre_raw").to_pylist()
    for i in rows.tolist():
        try:
            rec = json.loads(texts[i])
        except (ValueError, RecursionError):
            continue   # the query names it malformed_json
        if not isinstance(rec, dict):
            continue
        flat, bad = _conversation(rec, msgs_key, instr_key, resp_key)
        if flat is None and bad is None:
            continue
        raws[i] = texts[i].rstrip("\r\n")
        if bad is not None:
            reasons[i], details[i], texts[i] = bad[0], bad[1], None
        else:
            texts[i] = json.dumps(flat, ensure_ascii=False)
    return pa.table([chunk.column("row_number"), pa.array(texts, pa.large_string()), pa.array(reasons, pa.string()),
                     pa.array(details, pa.large_string()), pa.array(raws, pa.large_string())], schema=CHUNK_SCHEMA)
