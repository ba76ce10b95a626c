"""Triplets -> examples Parquet (token ids): the contrastive examples of CUT and the baselines' MLE rows.

    triplets (id, instruction, response, judgment, polarity, refined[, context])
        -> <out_dir>/<digest>.parquet   one row per example (docs/architecture.md):
              triplet_id: str, kind: str, input_ids: list[int32], response_start: int32
        -> <out_dir>/<digest>.json      stats: counts by kind, truncations, mean lengths, settings

What each objective writes (only labeled rows, polarity not null, are used):

    cut                 Align-P   plain(x)     + y   positives, at most align_p_ratio x #negatives
                        Align-N   judge(x, j-) + y   negatives
                        Misalign  plain(x)     + y   negatives; response ids identical to Align-N's
    self_distill        the same rows as cut (Align-N is the teacher of its Misalign twin)
    sft                 mle       plain(x)     + y   positives only
    hindsight           mle       judge(x, j)  + y   every triplet; a positive without judgment text
                                                     gets "The response is perfect."
    forward_prediction  mle       plain(x)     + y   every triplet
                        mle       forward(x, y) + j  every triplet; a positive without judgment text
                                                     gets "Perfect."
    ilf_mle             mle       plain(x)     + y_hat  y_hat from the `refined` column, else from
                                                     `refine_fn`; positives keep their own y (a
                                                     positive judgment asks for no change); a
                                                     negative without a refinement is skipped

Sequences are built from ids, never from concatenated text, by `sequences.py` (the module that
generation and evaluation encode prompts with too): the prompt is encoded (with BOS when the
tokenizer adds one), the target (response, judgment or refinement) is encoded *once* without
special tokens, and its ids plus EOS are appended. Align-N and Misalign therefore carry the very
same response ids, which the CUT loss pairs position by position.

Too long: the prompt is cut from the left (BOS kept), the target stays whole. A target that
would leave the prompt less than a quarter of max_length is itself cut at its end (EOS dropped,
since the text did not end there) so that the prompt keeps that quarter; a sequence with no
prompt left would carry no judgment and nothing to condition on. The cut is decided per triplet
and target so that Align-N and Misalign stay identical. Both truncations are counted in the stats.

The file is addressed by a digest of everything that decides its content (the labeled triplets'
ids and texts, the tokenizer, template, the objective's data settings, max_length, seed): the
same inputs find the existing file and return it untouched; it is written to a temporary name and
renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import polars as pl

from cut_core.data import sequences, templates
from cut_core.dsl import CUT, ILFDPO, ILFMLE, SFT, ForwardPrediction, Hindsight, ObjectiveSection, SelfDistill
from cut_core.files import write_atomic

# Bump when the way examples are built changes: old files must not be reused.
FORMAT_VERSION = 1
# When a target is too long, the prompt still keeps this share of max_length (sequences.py owns it).
PROMPT_RESERVE_FRACTION = sequences.PROMPT_RESERVE_FRACTION
# The contract's columns and types; nothing else goes into the Parquet file.
EXAMPLE_SCHEMA = {
    "triplet_id": pl.String,
    "kind": pl.String,
    "input_ids": pl.List(pl.Int32),
    "response_start": pl.Int32,
}
KINDS = ("align_p", "align_n", "misalign", "mle")
TRIPLET_COLUMNS = ("id", "instruction", "response", "judgment", "polarity", "refined")
# Optional boolean triplet column: the response was cut by the generation length limit (the model
# never stopped). Its sequences get no EOS: appending one would train (MLE) a stop the model never
# made, and CUT would compare the two contexts on that made-up stop.
UNFINISHED = "unfinished"
# Files that define a tokenizer on disk (hashed when the tokenizer was loaded from a folder).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
)

# refine_fn: a batch of (instruction, response, judgment) -> refined responses (None = no refinement).
RefineFn = Callable[[list[tuple[str, str, str]]], Sequence[str | None]]


# ---------------------------------------------------------------- input rows

def labeled_triplets(triplets: pl.DataFrame) -> pl.DataFrame:
    """The rows materialize uses: labeled (polarity not null), the six columns and `unfinished`
    (False where absent or null), sorted by id.

    Sorting makes the output (and the Align-P sample) independent of the order rows come in.
    `judgment`, `refined` and `context` may be absent from the input; they are then null.
    `context` (the warehouse's column) holds a multi-turn prompt's turns as JSON; the id already
    covers it (warehouse.triplet_id), so the digest reads the six columns only.
    """
    missing = [c for c in ("id", "instruction", "response", "polarity") if c not in triplets.columns]
    if missing:
        raise ValueError(f"triplets lack column(s) {missing}; expected {TRIPLET_COLUMNS}")
    frame = triplets.with_columns(
        [pl.lit(None, dtype=pl.String).alias(c) for c in ("judgment", "refined", "context")
         if c not in triplets.columns])
    unfinished = (pl.col(UNFINISHED).cast(pl.Boolean).fill_null(False) if UNFINISHED in triplets.columns
                  else pl.lit(False))
    frame = (
        frame.select(*[pl.col(c).cast(pl.String) for c in TRIPLET_COLUMNS + ("context",)],
                     unfinished.alias(UNFINISHED))
        .filter(pl.col("polarity").is_not_null())
        .sort("id")
    )
    bad = frame.filter(~pl.col("polarity").is_in(["positive", "negative"]))
    if bad.height:
        raise ValueError(f"polarity must be 'positive', 'negative' or null; got {bad['polarity'].unique().to_list()}")
    if frame["id"].n_unique() != frame.height:
        raise ValueError("triplet ids are not unique")
    return frame


# ---------------------------------------------------------------- digest

def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the tokenizer's ids: its files and its in-memory state.

    The files cover tokenizers without a `tokenizers` backend; the in-memory state (backend JSON,
    special tokens, chat template, and the ids of a probe text) covers edits made after loading,
    such as setting a chat template or a pad token.
    """
    h = hashlib.sha256()
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if folder.is_dir():
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                h.update(name.encode() + b"\x00" + (folder / name).read_bytes() + b"\x00")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    state = {
        "class": type(tokenizer).__name__,
        "special": {k: str(getattr(tokenizer, k, None)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
        "chat_template": getattr(tokenizer, "chat_template", None),
        "probe": tokenizer("Probe: 12 tokens\n\nend.")["input_ids"],
    }
    h.update(json.dumps(state, sort_keys=True, default=str).encode("utf-8"))
    return h.hexdigest()


def _triplets_hash(frame: pl.DataFrame) -> str:
    h = hashlib.sha256()
    for row in frame.select(TRIPLET_COLUMNS).iter_rows():
        for value in row:
            h.update(b"\x00" if value is None else b"\x01" + value.encode("utf-8"))
            h.update(b"\x1f")
        h.update(b"\x1e")
    if UNFINISHED in frame.columns and frame[UNFINISHED].any():  # else the digest of data without the column
        h.update(b"unfinished:" + ",".join(str(i) for i, u in enumerate(frame[UNFINISHED].to_list()) if u).encode())
    return h.hexdigest()


def _settings(objective: ObjectiveSection, template: str, max_length: int, seed: int,
              refine_name: str | None) -> dict:
    # Only the objective's *data* settings (align_p_ratio, refined_column where the method has
    # them): a sweep over threshold/alpha/gamma reuses one file.
    return {
        "format_version": FORMAT_VERSION,
        "objective": objective.name,
        **objective.data_settings(),
        "refine_fn": refine_name if isinstance(objective, ILFMLE) else None,
        "template": template,
        "max_length": max_length,
        "seed": seed,
        "prompt_reserve_fraction": PROMPT_RESERVE_FRACTION,
    }


def examples_digest(
    triplets: pl.DataFrame,
    tokenizer: Any,
    *,
    objective: ObjectiveSection,
    template: str,
    max_length: int,
    seed: int = 42,
    refine_name: str | None = None,
) -> str:
    """The digest that names the examples file; cheap (no tokenization of the triplets)."""
    return _digest(labeled_triplets(triplets), tokenizer,
                   _settings(objective, template, max_length, seed, refine_name))


def _digest(frame: pl.DataFrame, tokenizer: Any, settings: dict) -> str:
    payload = json.dumps({"settings": settings, "triplets": _triplets_hash(frame),
                          "tokenizer": tokenizer_fingerprint(tokenizer)}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


# ---------------------------------------------------------------- the plan: (triplet, kind, prompt, target) rows

def _rows(src: pl.DataFrame, kind: str, order: int, prompt_kind: str,
          judgment: pl.Expr | None = None, target: pl.Expr | None = None) -> pl.DataFrame:
    """Examples of one kind; the target is the response unless given. An EOS follows the target,
    except after a response the length limit cut (UNFINISHED): the model never wrote that stop."""
    ends = ~pl.col(UNFINISHED) if target is None else pl.lit(True)
    target = pl.col("response") if target is None else target
    return src.select(
        pl.col("id").alias("triplet_id"),
        pl.lit(kind).alias("kind"),
        pl.lit(order, dtype=pl.Int8).alias("order"),
        pl.lit(prompt_kind).alias("prompt_kind"),
        pl.col("instruction"),
        pl.col("context"),
        pl.col("response"),
        (judgment if judgment is not None else pl.lit(None, dtype=pl.String)).alias("judgment"),
        target.alias("target"),
        ends.alias("ends"),
    )


def _judgment_or(default: str) -> pl.Expr:
    return pl.when(pl.col("judgment").is_null() | (pl.col("judgment").str.strip_chars() == "")) \
        .then(pl.lit(default)).otherwise(pl.col("judgment"))


def _with_judgment(neg: pl.DataFrame) -> pl.DataFrame:
    """A negative needs its text: Align-N, Hindsight and Forward Prediction condition on or predict it."""
    return neg.filter(pl.col("judgment").is_not_null() & (pl.col("judgment").str.strip_chars() != ""))


def _contrastive_plan(pos, neg, objective: CUT | SelfDistill, seed, refine_fn, stats) -> list[pl.DataFrame]:
    """CUT and self_distill: Align-P (a sample of positives), Align-N and its Misalign twin."""
    neg_text = _with_judgment(neg)
    stats["negatives_without_judgment"] = neg.height - neg_text.height
    keep = pos.height
    if objective.align_p_ratio is not None:
        keep = min(pos.height, int(objective.align_p_ratio * neg_text.height))
    # Sample over the id-sorted rows with a private RNG: same inputs + seed, same sample.
    kept_ids = sorted(random.Random(seed).sample(pos["id"].to_list(), keep))
    stats.update(align_p_available=pos.height, align_p_kept=keep)
    return [_rows(pos.filter(pl.col("id").is_in(kept_ids)), "align_p", 0, "plain"),
            _rows(neg_text, "align_n", 0, "judge", pl.col("judgment")),
            _rows(neg_text, "misalign", 1, "plain")]


def _sft_plan(pos, neg, objective, seed, refine_fn, stats) -> list[pl.DataFrame]:
    return [_rows(pos, "mle", 0, "plain")]


def _hindsight_plan(pos, neg, objective, seed, refine_fn, stats) -> list[pl.DataFrame]:
    neg_text = _with_judgment(neg)
    stats["negatives_without_judgment"] = neg.height - neg_text.height
    return [_rows(pos, "mle", 0, "judge", _judgment_or(templates.POSITIVE_JUDGMENT_HINDSIGHT)),
            _rows(neg_text, "mle", 0, "judge", pl.col("judgment"))]


def _forward_plan(pos, neg, objective, seed, refine_fn, stats) -> list[pl.DataFrame]:
    neg_text = _with_judgment(neg)
    stats["negatives_without_judgment"] = neg.height - neg_text.height
    return [_rows(pl.concat([pos, neg]).sort("id"), "mle", 0, "plain"),
            _rows(pos, "mle", 1, "forward", target=_judgment_or(templates.POSITIVE_JUDGMENT_FORWARD)),
            _rows(neg_text, "mle", 1, "forward", target=pl.col("judgment"))]


def _ilf_plan(pos, neg, objective: ILFMLE, seed, refine_fn, stats) -> list[pl.DataFrame]:
    return [_ilf_rows(pos, neg, objective, refine_fn, stats)]


# The one dispatch of the methods that train on examples (CUTTrainer), by section class; the
# preference-pair methods (DPO, ILFDPO: `ObjectiveSection.preference_pairs`) go to preference.py.
PLANS: dict[type[ObjectiveSection], Callable[..., list[pl.DataFrame]]] = {
    CUT: _contrastive_plan, SelfDistill: _contrastive_plan, SFT: _sft_plan, Hindsight: _hindsight_plan,
    ForwardPrediction: _forward_plan, ILFMLE: _ilf_plan,
}


def _plan(
    frame: pl.DataFrame,
    objective: ObjectiveSection,
    seed: int,
    refine_fn: RefineFn | None,
    stats: dict,
) -> pl.DataFrame:
    """Which examples to build, as text: columns triplet_id, kind, order, prompt_kind, judgment, target.

    `prompt_kind` is a templates.render kind; `order` keeps Align-N before its Misalign twin.
    """
    plan = PLANS.get(type(objective))
    if plan is None:
        raise ValueError(f"objective {objective.name!r} trains on preference pairs (preference.materialize_pairs), "
                         "not on examples")
    pos = frame.filter(pl.col("polarity") == "positive")
    neg = frame.filter(pl.col("polarity") == "negative")
    stats.update(positives=pos.height, negatives=neg.height)
    return pl.concat(plan(pos, neg, objective, seed, refine_fn, stats)).sort("triplet_id", "order")


def _ilf_rows(pos: pl.DataFrame, neg: pl.DataFrame, objective: ILFMLE, refine_fn: RefineFn | None,
              stats: dict) -> pl.DataFrame:
    """ILF-MLE: y_hat | x. Positives keep their y (a positive judgment asks for no change)."""
    pos = pos.with_columns(pl.coalesce(_data_refinement(objective), pl.col("response")).alias("y_hat"))
    usable = refined_negatives(neg, objective, refine_fn, stats)
    stats["ilf_positives_as_is"] = pos.height
    return pl.concat([_rows(pos, "mle", 0, "plain", target=pl.col("y_hat")),
                      _rows(usable, "mle", 0, "plain", target=pl.col("y_hat"))])


def _data_refinement(objective: ILFMLE | ILFDPO) -> pl.Expr:
    """The data's `refined` text when the objective reads it and it is not blank, else null."""
    if not objective.refined_column:
        return pl.lit(None, dtype=pl.String)
    return pl.when(pl.col("refined").str.strip_chars() != "").then(pl.col("refined"))


def refined_negatives(neg: pl.DataFrame, objective: ILFMLE | ILFDPO, refine_fn: RefineFn | None,
                      stats: dict) -> pl.DataFrame:
    """The negatives that have a refinement, with it as `y_hat` (ILF-MLE and ILF-DPO).

    y_hat is the data's `refined` text (when objective.refined_column), else what `refine_fn`
    returns for the rest, called once with all of them. A negative left without one is skipped
    and counted in `stats` (ilf_refined_from_column, ilf_refined_generated, ilf_skipped_no_refinement).
    """
    neg = neg.with_columns(_data_refinement(objective).alias("y_hat"))
    from_column = neg.filter(pl.col("y_hat").is_not_null()).height
    need = neg.filter(pl.col("y_hat").is_null())
    if need.height and refine_fn is None and not objective.refined_column:
        raise ValueError(f"{objective.name} with refined_column=False needs a refiner to write refinements "
                         f"({type(objective).__name__}(refiner='model') or refiner='module:function')")
    generated = 0
    if need.height and refine_fn is not None:
        items = [(i, r, j or "") for i, r, j in need.select("instruction", "response", "judgment").iter_rows()]
        outputs = list(refine_fn(items))
        if len(outputs) != len(items):
            raise ValueError(f"refine_fn returned {len(outputs)} refinements for {len(items)} items")
        outputs = [o if o and o.strip() else None for o in outputs]
        generated = sum(o is not None for o in outputs)
        gen = need.select("id").with_columns(pl.Series("generated", outputs, dtype=pl.String))
        neg = neg.join(gen, on="id", how="left").with_columns(
            pl.coalesce("y_hat", "generated").alias("y_hat")).drop("generated")
    usable = neg.filter(pl.col("y_hat").is_not_null())
    stats.update(ilf_refined_from_column=from_column, ilf_refined_generated=generated,
                 ilf_skipped_no_refinement=neg.height - usable.height)
    return usable


# ---------------------------------------------------------------- tokenization

def _prompt_text(row: dict, template: str, tokenizer: Any) -> str:
    return templates.render(row["prompt_kind"], template, row["instruction"], judgment=row["judgment"],
                            response=row["response"], tokenizer=tokenizer, context=row["context"])


def _tokenize(plan: pl.DataFrame, tokenizer: Any, template: str) -> pl.DataFrame:
    """Add prompt_ids (sequences.prompt_ids: BOS rule) and target_ids (no special tokens); every
    distinct text is encoded once."""
    prompts = [_prompt_text(r, template, tokenizer) for r in plan.iter_rows(named=True)]
    plan = plan.with_columns(pl.Series("prompt", prompts, dtype=pl.String))

    def table(column: str, ids_name: str, encode: Callable[[Any, list[str]], list[list[int]]]) -> pl.DataFrame:
        texts = plan[column].unique(maintain_order=True).to_list()
        return pl.DataFrame({column: texts, ids_name: encode(tokenizer, texts)},
                            schema={column: pl.String, ids_name: pl.List(pl.Int32)})

    return (plan.join(table("prompt", "prompt_ids", sequences.prompt_ids), on="prompt", how="left")
                .join(table("target", "target_ids", sequences.encode_texts), on="target", how="left"))


def _fit(plan: pl.DataFrame, max_length: int, eos: int, bos: int | None) -> pl.DataFrame:
    """Build input_ids/response_start under max_length with `sequences.fit` (module docstring).

    The prompt room a target must leave is decided over the rows that share the target within a
    triplet (Align-N and Misalign), by the longest prompt, so both cut the target alike."""
    plan = plan.with_columns(reserve=pl.col("prompt_ids").list.len().max().over("triplet_id", "target"))
    fitted = [sequences.fit(list(p), list(t) + ([eos] if e else []), max_length, bos, reserve_prompt_length=r)
              for p, t, r, e in zip(plan["prompt_ids"].to_list(), plan["target_ids"].to_list(),
                                    plan["reserve"].to_list(), plan["ends"].to_list())]
    return plan.with_columns(
        pl.Series("input_ids", [f.input_ids for f in fitted], dtype=pl.List(pl.Int32)),
        pl.Series("response_start", [f.response_start for f in fitted], dtype=pl.Int32),
        pl.Series("prompt_truncated", [f.prompt_truncated for f in fitted], dtype=pl.Boolean),
        pl.Series("response_truncated", [f.response_truncated for f in fitted], dtype=pl.Boolean),
    )


# ---------------------------------------------------------------- stats and files

def _stats(examples: pl.DataFrame) -> dict:
    by_kind = examples.group_by("kind").agg(
        rows=pl.len(),
        mean_prompt_tokens=pl.col("response_start").mean(),
        mean_response_tokens=(pl.col("input_ids").list.len() - pl.col("response_start")).mean(),
        mean_total_tokens=pl.col("input_ids").list.len().mean(),
        max_total_tokens=pl.col("input_ids").list.len().max(),
        prompt_truncated=pl.col("prompt_truncated").sum(),
        response_truncated=pl.col("response_truncated").sum(),
    ).sort("kind")
    return {
        "rows": examples.height,
        "rows_by_kind": {k: n for k, n in by_kind.select("kind", "rows").iter_rows()},
        "prompt_truncated": int(examples["prompt_truncated"].sum()),
        "response_truncated": int(examples["response_truncated"].sum()),
        "rows_without_eos": int((~examples["ends"]).sum()),  # targets of unfinished responses
        "by_kind": {r["kind"]: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k != "kind"}
                    for r in by_kind.iter_rows(named=True)},
    }


def write_with_stats(path: Path, frame: pl.DataFrame, stats: dict) -> Path:
    """Write the sidecar stats, then the Parquet file, each atomically: the Parquet file's
    presence is the "done" marker, so a reader never finds it without its stats."""
    write_atomic(stats_path(path), lambda p: p.write_text(json.dumps(stats, indent=2)))
    return write_atomic(path, lambda p: frame.write_parquet(p))


def stats_path(parquet: Path) -> Path:
    return Path(parquet).with_suffix(".json")


def read_stats(parquet: str | Path) -> dict:
    """The sidecar stats of an examples file ({} when it has none)."""
    p = stats_path(Path(parquet))
    return json.loads(p.read_text()) if p.exists() else {}


# ---------------------------------------------------------------- entry point

def check_template(tokenizer: Any, template: str) -> None:
    """The template/tokenizer mistakes a user can fix, raised before any work."""
    if template not in templates.TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {templates.TEMPLATES}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; every sequence ends with EOS")
    if template == "chat" and not templates.has_chat_template(tokenizer):
        raise ValueError("template='chat' needs a tokenizer with a chat template; use template='alpaca'")


def refiner_name(refine_fn: RefineFn | None, refine_name: str | None) -> str | None:
    """The name a refine_fn enters the digest by: the given one, else its own `name` (a
    ModelRefiner's names the model's weights), else its module and qualified name. Never a repr:
    an object's carries its memory address, which would give the same data a new file per process."""
    if refine_fn is None or refine_name is not None:
        return refine_name
    if isinstance(getattr(refine_fn, "name", None), str):
        return refine_fn.name
    return f"{getattr(refine_fn, '__module__', '?')}.{getattr(refine_fn, '__qualname__', repr(refine_fn))}"


def materialize(
    triplets: pl.DataFrame,
    tokenizer: Any,
    *,
    objective: ObjectiveSection,
    template: str = "alpaca",
    max_length: int = 2048,
    out_dir: str | Path,
    seed: int = 42,
    refine_fn: RefineFn | None = None,
    refine_name: str | None = None,
) -> Path:
    """Write (or find) the examples Parquet for these triplets and return its path.

    triplets: a Polars frame with columns id, instruction (input already appended), response,
        judgment, polarity ('positive' | 'negative' | null = unlabeled, skipped) and optionally
        refined.
    tokenizer: a transformers tokenizer (needs an EOS token; a chat template for template='chat').
    objective: the DSL objective section; its name and data_settings() (align_p_ratio for cut and
        self_distill, refined_column for ilf_mle) decide the rows.
    refine_fn: ilf_mle only; called once with the (instruction, response, judgment) of every
        negative that has no refined text, returns one refinement (or None) each. It enters the
        digest by `refine_name` (default: its module and qualified name): change the name when
        the generator changes, as with a judge's name.
    Returns `<out_dir>/<digest>.parquet`; `read_stats(path)` gives the sidecar stats.
    """
    check_template(tokenizer, template)
    refine_name = refiner_name(refine_fn, refine_name)

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = labeled_triplets(triplets)
    settings = _settings(objective, template, max_length, seed, refine_name)
    digest = _digest(frame, tokenizer, settings)
    path = out_dir / f"{digest}.parquet"
    if path.exists():  # the same inputs: reuse, never rebuild
        return path

    stats: dict[str, Any] = {"triplets_in": triplets.height, "unlabeled_skipped": triplets.height - frame.height,
                             "labeled": frame.height}
    plan = _plan(frame, objective, seed, refine_fn, stats)
    plan = _tokenize(plan, tokenizer, template)
    examples = _fit(plan, max_length, tokenizer.eos_token_id, sequences.bos_to_add(tokenizer))
    stats.update(_stats(examples))
    stats.update(digest=digest, settings=settings, tokenizer=str(getattr(tokenizer, "name_or_path", "")),
                 seconds=round(time.perf_counter() - started, 3))

    out = examples.select(pl.col(c).cast(t) for c, t in EXAMPLE_SCHEMA.items())
    return write_with_stats(path, out, stats)
