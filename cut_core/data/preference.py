"""Triplets -> preference pairs Parquet (text), for DPO and ILF-DPO through TRL's DPOTrainer.

    triplets (id, instruction, response, judgment, polarity, refined, score)
        -> <out_dir>/<digest>.parquet   one row per pair:
              triplet_id: str (the rejected response's triplet), chosen_id: str | null,
              prompt: str (the plain template, rendered), chosen: str, rejected: str,
              chosen_reward: f64 | null, rejected_reward: f64 | null
        -> <out_dir>/<digest>.json      stats: pairs, instructions, skips, settings

The two objectives, as METHOD.md's baseline table defines them:

    dpo       "preference pairs from scalar rewards": a triplet's reward is its source's score
              when it has one, else 1 for a positive and 0 for a negative judgment. For each
              instruction, its best-rewarded response (ties: the lowest id) is chosen against
              every response of that instruction with a strictly lower reward. An instruction
              with a single response, or only equal rewards, gives no pair (counted).
    ilf_dpo   "DPO with y_hat preferred over y for prompt x": one pair per negative that has a
              refinement y_hat (the data's `refined` column, else the refiner; contrast.py's
              `refined_negatives`), chosen y_hat, rejected y. Positives give no pair.

TRL tokenizes `prompt + chosen` itself (and appends EOS), so the file holds text; the prompt is
the same plain template the model is trained and evaluated with. The file is addressed by a
digest of everything that decides it, exactly as contrast.py's examples are: the same inputs
find the existing file, and a half-written file is never visible.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import polars as pl

from cut_core.data import templates
from cut_core.data.contrast import (RefineFn, _digest, check_template, labeled_triplets, refined_negatives,
                               refiner_name, write_with_stats)
from cut_core.dsl import DPO, ILFDPO, ObjectiveSection

# Bump when the way pairs are built changes: old files must not be reused.
FORMAT_VERSION = 1
PAIR_SCHEMA = {
    "triplet_id": pl.String,
    "chosen_id": pl.String,
    "prompt": pl.String,
    "chosen": pl.String,
    "rejected": pl.String,
    "chosen_reward": pl.Float64,
    "rejected_reward": pl.Float64,
}


def _with_scores(triplets: pl.DataFrame) -> pl.DataFrame:
    """labeled_triplets' rows plus the `score` column (null when the source gave none)."""
    frame = labeled_triplets(triplets)
    if "score" not in triplets.columns:
        return frame.with_columns(pl.lit(None, dtype=pl.Float64).alias("score"))
    scores = triplets.select(pl.col("id").cast(pl.String), pl.col("score").cast(pl.Float64))
    return frame.join(scores, on="id", how="left")


def _scores_hash(frame: pl.DataFrame) -> str:
    h = hashlib.sha256()
    for tid, score in frame.select("id", "score").iter_rows():
        h.update(f"{tid}\x1f{score!r}\x1e".encode("utf-8"))
    return h.hexdigest()


def _settings(frame: pl.DataFrame, objective: ObjectiveSection, template: str, refine_name: str | None) -> dict:
    return {
        "format_version": f"preference-{FORMAT_VERSION}",
        "objective": objective.name,
        "template": template,
        # dpo reads scores; ilf_dpo reads refinements: each digest covers only what it reads.
        "scores": _scores_hash(frame) if isinstance(objective, DPO) else None,
        "refined_column": objective.refined_column if isinstance(objective, ILFDPO) else None,
        "refine_fn": refine_name if isinstance(objective, ILFDPO) else None,
    }


# ---------------------------------------------------------------- the pairs, as text

def reward_pairs(frame: pl.DataFrame, stats: dict) -> pl.DataFrame:
    """DPO: per instruction, the best response against each strictly worse one."""
    rewarded = frame.with_columns(
        reward=pl.coalesce(pl.col("score"), pl.when(pl.col("polarity") == "positive").then(1.0).otherwise(0.0)))
    best = (rewarded.sort(["instruction", "reward", "id"], descending=[False, True, False])
            .group_by("instruction", maintain_order=True).first()
            .select("instruction", pl.col("id").alias("chosen_id"), pl.col("response").alias("chosen"),
                    pl.col("reward").alias("chosen_reward")))
    pairs = (rewarded.join(best, on="instruction")
             .filter(pl.col("reward") < pl.col("chosen_reward"))
             .select(pl.col("id").alias("triplet_id"), "chosen_id", "instruction", "chosen",
                     pl.col("response").alias("rejected"), "chosen_reward",
                     pl.col("reward").alias("rejected_reward")))
    instructions = rewarded["instruction"].n_unique()
    paired = pairs["instruction"].n_unique()
    stats.update(instructions=instructions, instructions_paired=paired,
                 instructions_without_pair=instructions - paired,
                 scored_triplets=int(frame["score"].is_not_null().sum()))
    return pairs


def refinement_pairs(frame: pl.DataFrame, objective: ILFDPO, refine_fn: RefineFn | None,
                     stats: dict) -> pl.DataFrame:
    """ILF-DPO: y_hat over y for every negative that has a refinement."""
    neg = frame.filter(pl.col("polarity") == "negative")
    stats.update(positives_unused=frame.height - neg.height, negatives=neg.height)
    usable = refined_negatives(neg, objective, refine_fn, stats)
    return usable.select(
        pl.col("id").alias("triplet_id"), pl.lit(None, dtype=pl.String).alias("chosen_id"), "instruction",
        pl.col("y_hat").alias("chosen"), pl.col("response").alias("rejected"),
        pl.lit(None, dtype=pl.Float64).alias("chosen_reward"), pl.lit(None, dtype=pl.Float64).alias("rejected_reward"))


# ---------------------------------------------------------------- entry point

def materialize_pairs(
    triplets: pl.DataFrame,
    tokenizer: Any,
    *,
    objective: ObjectiveSection,
    template: str = "alpaca",
    out_dir: str | Path,
    refine_fn: RefineFn | None = None,
    refine_name: str | None = None,
) -> Path:
    """Write (or find) the preference pairs Parquet for these triplets and return its path.

    triplets: columns id, instruction, response, polarity, and optionally judgment, refined,
        score (see contrast.materialize). tokenizer: renders the chat template when
        template='chat', and enters the digest. refine_fn / refine_name: ilf_dpo only, as in
        contrast.materialize. Raises ValueError when no pair can be built: DPO on nothing
        would train on nothing.
    """
    if not objective.preference_pairs:
        raise ValueError(f"materialize_pairs builds preference pairs (DPO, ILFDPO); {objective.name!r} trains on "
                         "examples: contrast.materialize")
    check_template(tokenizer, template)
    refine_name = refiner_name(refine_fn, refine_name)

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = _with_scores(triplets)
    settings = _settings(frame, objective, template, refine_name)
    digest = _digest(frame, tokenizer, settings)
    path = out_dir / f"{digest}.parquet"
    if path.exists():
        return path

    stats: dict[str, Any] = {"triplets_in": triplets.height, "unlabeled_skipped": triplets.height - frame.height,
                             "labeled": frame.height}
    if isinstance(objective, DPO):
        pairs = reward_pairs(frame, stats)
    else:
        pairs = refinement_pairs(frame, objective, refine_fn, stats)
    if pairs.height == 0:
        hint = ("DPO pairs need at least two responses with different rewards for one instruction "
                "(a score column, or a positive and a negative judgment)" if isinstance(objective, DPO)
                else "ILF-DPO pairs need negatives with a refinement (a 'refined' column or a refiner)")
        raise ValueError(f"no preference pairs from {frame.height} labeled triplets: {hint}; stats {stats}")
    # a multi-turn instruction renders with its stored turns (the text names the conversation)
    contexts = dict(frame.filter(pl.col("context").is_not_null()).select("instruction", "context")
                    .unique("instruction", keep="first", maintain_order=True).iter_rows())
    prompts = {x: templates.render("plain", template, x, tokenizer=tokenizer, context=contexts.get(x))
               for x in pairs["instruction"].unique().to_list()}
    pairs = pairs.with_columns(pl.col("instruction").replace_strict(prompts, return_dtype=pl.String).alias("prompt"))
    out = pairs.sort("triplet_id").select(pl.col(c).cast(t) for c, t in PAIR_SCHEMA.items())
    stats.update(rows=out.height, rows_by_kind={objective.name: out.height},
                 mean_chosen_chars=round(out["chosen"].str.len_chars().mean(), 1),
                 mean_rejected_chars=round(out["rejected"].str.len_chars().mean(), 1),
                 digest=digest, settings=settings, tokenizer=str(getattr(tokenizer, "name_or_path", "")),
                 seconds=round(time.perf_counter() - started, 3))
    return write_with_stats(path, out, stats)


def load_pairs(path: str | Path) -> pl.DataFrame:
    """A pairs file, checked to be one (an examples file of token ids is not)."""
    frame = pl.read_parquet(path)
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} is not a preference pairs file (no column(s) {missing}): materialize the "
                         "examples for a dpo/ilf_dpo objective")
    return frame
