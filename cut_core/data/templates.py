"""Prompt templates: the exact Alpaca strings of METHOD.md §3, their chat variant, and the
prompts the baselines need.

CUT builds three sequences from one triplet (x, y, j); they differ only in the prompt:

    Align-P   plain prompt(x)      + y     (positive judgment)
    Align-N   judge prompt(x, j-)  + y     (negative judgment, placed *before* the response)
    Misalign  plain prompt(x)      + y     (the Align-N triplet with its judgment taken away)

The Alpaca strings below are the reference code's, byte for byte: the published numbers use
them, so they are the default. A model that ships a chat template can use the chat variant
instead: the same content in a single user turn, the judgment in its own block.

Every function here returns *text*; turning text into ids (BOS, response appended as ids) is
`contrast.py`'s job, because the response must be tokenized once and shared by Align-N and
Misalign.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Sequence, Union

TemplateName = Literal["alpaca", "chat"]
TEMPLATES: tuple[str, ...] = ("alpaca", "chat")

# ---------------------------------------------------------------- the paper's strings (METHOD.md §3)

PLAIN_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
JUDGE_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response to the instruction and the response should match the corresponding judgment."
)

INSTRUCTION_HEADER = "### Instruction:"
JUDGMENT_HEADER = "### Judgment:"
RESPONSE_HEADER = "### Response:"

# Plain: Align-P, Misalign, and inference (generation uses this one too).
PROMPT_PLAIN = PLAIN_PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
# Judge: Align-N; the judgment comes before the response so that the response "matches" it.
PROMPT_JUDGE = (
    JUDGE_PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Judgment:\n{judgment}\n\n### Response:\n"
)

# ---------------------------------------------------------------- baselines' prompts (ours, same style)
# The paper names these baselines but the reference code does not fix their wording; these
# follow the Alpaca layout so that the tiny tokenizer's header tokens cover them too.

# Forward Prediction, second half: predict the judgment j given [x, y].
FORWARD_PREAMBLE = (
    "Below is an instruction that describes a task, paired with a response. "
    "Write a judgment that evaluates the response."
)
PROMPT_FORWARD = (
    FORWARD_PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Response:\n{response}\n\n### Judgment:\n"
)

# ILF: ask a model for a refined response y_hat = refine(x, y, j).
REFINED_HEADER = "### Refined Response:"
REFINE_PREAMBLE = (
    "Below is an instruction that describes a task, a response to it, and a judgment of that response. "
    "Write an improved response that fixes every mistake the judgment names."
)
PROMPT_REFINE = (
    REFINE_PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Response:\n{response}"
    "\n\n### Judgment:\n{judgment}\n\n### Refined Response:\n"
)

# Judgment texts used where a positive triplet carries none (the data stores `null` for "perfect").
POSITIVE_JUDGMENT_HINDSIGHT = "The response is perfect."
POSITIVE_JUDGMENT_FORWARD = "Perfect."

# Strings worth a single token in a small tokenizer (tiny.py): they occur in every prompt.
TEMPLATE_TOKENS: tuple[str, ...] = (
    PLAIN_PREAMBLE,
    JUDGE_PREAMBLE,
    FORWARD_PREAMBLE,
    REFINE_PREAMBLE,
    INSTRUCTION_HEADER,
    JUDGMENT_HEADER,
    RESPONSE_HEADER,
    REFINED_HEADER,
)


def format_instruction(instruction: str, input: str | None = None) -> str:
    """The instruction text of a prompt: a non-empty `input` is appended after one newline."""
    if input:
        return f"{instruction}\n{input}"
    return instruction


def plain_prompt(instruction: str) -> str:
    """Alpaca plain prompt (Align-P, Misalign, inference); `instruction` already holds any input."""
    return PROMPT_PLAIN.format(instruction=instruction)


def judge_prompt(instruction: str, judgment: str) -> str:
    """Alpaca judge prompt (Align-N, Hindsight): the judgment sits between instruction and response."""
    return PROMPT_JUDGE.format(instruction=instruction, judgment=judgment)


def forward_prompt(instruction: str, response: str) -> str:
    """Forward Prediction: the prompt after which the model writes the judgment of `response`."""
    return PROMPT_FORWARD.format(instruction=instruction, response=response)


def refine_prompt(instruction: str, response: str, judgment: str) -> str:
    """ILF: the prompt after which a model writes a refined response."""
    return PROMPT_REFINE.format(instruction=instruction, response=response, judgment=judgment)


# ---------------------------------------------------------------- multi-turn contexts
# A conversation's prompt is a list of turns {role, content} ending with the user turn the
# response answers (cut_core.data.ingest.conversations builds them from `messages` and TRL's
# prompt/completion rows). The warehouse keeps two forms of it: `instruction`, the conversation as text
# (conversation_text: what Alpaca templates, judges and dedupe read), and `context`, the turns
# as canonical JSON (context_json: what the chat template renders). A conversation of one user
# turn and nothing else is a flat instruction: its context is None.

Turn = dict
Prompt = Union[str, Sequence[Turn]]   # an instruction, or a conversation's prompt turns
ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}


def conversation_text(turns: Sequence[Turn]) -> str:
    """Prompt turns as Alpaca-style text: each turn as 'Role: content', separated by a blank line
    (a single user turn is its content alone)."""
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    return "\n\n".join(f"{ROLE_LABELS.get(t['role'], str(t['role']).capitalize())}: {t['content']}" for t in turns)


def context_json(turns: Sequence[Turn]) -> str | None:
    """The stored form of prompt turns (role and content only, compact, key order fixed), or None
    for a single user turn (a flat instruction)."""
    if len(turns) == 1 and turns[0]["role"] == "user":
        return None
    return json.dumps([{"role": t["role"], "content": t["content"]} for t in turns],
                      ensure_ascii=False, separators=(",", ":"))


def check_turns(turns: Any) -> list[Turn]:
    """Prompt turns as given to generation or evaluation: a non-empty list of {role, content}
    strings whose last turn is the user's. Raises ValueError naming what is wrong."""
    if not isinstance(turns, (list, tuple)) or not turns:
        raise ValueError("a conversation prompt is a non-empty list of {role, content} turns")
    for k, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("role"), str) or not isinstance(t.get("content"), str):
            raise ValueError(f"turn {k} of a conversation prompt is not {{role: str, content: str}}: {t!r:.120}")
    if turns[-1]["role"] != "user":
        raise ValueError(f"a conversation prompt ends with the user turn the response answers; "
                         f"its last turn is {turns[-1]['role']!r}")
    return [dict(role=t["role"], content=t["content"]) for t in turns]


def split_prompt(prompt: Prompt, context: str | Sequence[Turn] | None = None) -> tuple[str, list[Turn] | None]:
    """(instruction text, prompt turns or None) of an instruction string or a list of turns; a
    stored `context` (JSON text or turns) gives the turns of an instruction that has them."""
    if isinstance(prompt, str):
        if context is None:
            return prompt, None
        turns = check_turns(json.loads(context) if isinstance(context, str) else context)
        return prompt, turns
    turns = check_turns(prompt)
    return conversation_text(turns), (turns if context_json(turns) is not None else None)


def prompt_text(prompt: Prompt) -> str:
    """The instruction text of a prompt (what judges and Alpaca templates read)."""
    return split_prompt(prompt)[0]


# ---------------------------------------------------------------- chat variant
# One user turn; the assistant turn is opened by `add_generation_prompt=True` and the response
# ids are appended by contrast.py. The judgment gets its own block so that the plain (Misalign)
# and judge (Align-N) user turns differ only by that block plus one sentence.

CHAT_JUDGE_USER = (
    "{instruction}\n\n### Judgment:\n{judgment}\n\n"
    "Write a response to the instruction above that matches this judgment."
)
CHAT_FORWARD_USER = (
    "{instruction}\n\n### Response:\n{response}\n\n"
    "Write a judgment that evaluates the response above."
)
CHAT_REFINE_USER = (
    "{instruction}\n\n### Response:\n{response}\n\n### Judgment:\n{judgment}\n\n"
    "Write an improved response that fixes every mistake the judgment names."
)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer: Any, user: str, earlier: Sequence[Turn] = ()) -> str:
    """Render one user turn (after the `earlier` turns of a conversation, if any) with the
    tokenizer's chat template, assistant turn opened.

    Returned as text (transformers 5's `apply_chat_template(tokenize=True)` returns a dict);
    the text usually contains the BOS token already, so encode it without special tokens.
    """
    if not has_chat_template(tokenizer):
        raise ValueError(
            "template='chat' needs a tokenizer with a chat template; this one has none "
            "(use template='alpaca', or set tokenizer.chat_template)")
    return tokenizer.apply_chat_template(
        [*earlier, {"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)


def chat_plain_prompt(tokenizer: Any, instruction: str) -> str:
    return chat_prompt(tokenizer, instruction)


def chat_judge_prompt(tokenizer: Any, instruction: str, judgment: str) -> str:
    return chat_prompt(tokenizer, CHAT_JUDGE_USER.format(instruction=instruction, judgment=judgment))


# ---------------------------------------------------------------- one entry point per prompt kind

def render(
    kind: Literal["plain", "judge", "forward", "refine"],
    template: str,
    instruction: Prompt,
    *,
    judgment: str | None = None,
    response: str | None = None,
    tokenizer: Any = None,
    context: str | Sequence[Turn] | None = None,
) -> str:
    """The prompt text of `kind` in `template` ('alpaca' or 'chat'; 'chat' needs the tokenizer).

    A multi-turn prompt (`instruction` as a list of turns, or its text with the stored `context`
    turns): 'alpaca' renders its text (conversation_text) as the instruction; 'chat' renders the
    earlier turns as turns and puts this kind's user text (the judgment block for 'judge') in the
    last user turn, exactly where a single-turn prompt has it.
    """
    instruction, turns = split_prompt(instruction, context)
    earlier: Sequence[Turn] = ()
    if turns is not None and template == "chat":
        earlier, instruction = turns[:-1], turns[-1]["content"]
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
    needs = {"plain": (), "judge": ("judgment",), "forward": ("response",), "refine": ("response", "judgment")}
    if kind not in needs:
        raise ValueError(f"unknown prompt kind {kind!r}; choose one of {tuple(needs)}")
    values = {"judgment": judgment, "response": response}
    missing = [k for k in needs[kind] if values[k] is None]
    if missing:
        raise ValueError(f"a {kind} prompt needs {missing}")
    if template == "alpaca":
        if kind == "plain":
            return plain_prompt(instruction)
        if kind == "judge":
            return judge_prompt(instruction, judgment)  # type: ignore[arg-type]
        if kind == "forward":
            return forward_prompt(instruction, response)  # type: ignore[arg-type]
        return refine_prompt(instruction, response, judgment)  # type: ignore[arg-type]
    if kind == "plain":
        return chat_prompt(tokenizer, instruction, earlier)
    if kind == "judge":
        return chat_prompt(tokenizer, CHAT_JUDGE_USER.format(instruction=instruction, judgment=judgment), earlier)
    if kind == "forward":
        return chat_prompt(tokenizer, CHAT_FORWARD_USER.format(instruction=instruction, response=response), earlier)
    return chat_prompt(tokenizer, CHAT_REFINE_USER.format(
        instruction=instruction, response=response, judgment=judgment), earlier)
