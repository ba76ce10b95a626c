"""The generate task: the current model answers this iteration's new instructions.

Instructions come from the pipeline's prompt file in order; each iteration takes the next
ones its pipeline has never used, so no instruction is used twice.
"""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
from prefect import task
from prefect.logging import get_run_logger

from cut_core.data import templates
from cut_core.infer import engines
from cut_core.data import warehouse as wh
from cut_core.dsl import Generation


def read_prompts(path: str) -> pl.DataFrame:
    """Prompt files are JSONL/JSON/Parquet/CSV with an `instruction` column (and optional `input`),
    or a `messages` column of prompt turns ({role, content}, ending with the user turn to answer):
    `instruction` is then the conversation as text (templates.conversation_text) and `messages`
    stays for evaluation, which renders the turns."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        frame = pl.read_ndjson(path)
    elif suffix == ".json":
        frame = pl.read_json(path)
    elif suffix == ".parquet":
        frame = pl.read_parquet(path)
    elif suffix == ".csv":
        frame = pl.read_csv(path)
    else:
        raise ValueError(f"{path}: unsupported prompt file type {suffix!r} (use .jsonl, .json, .parquet or .csv)")
    if "instruction" not in frame.columns and "messages" in frame.columns:
        turns = []
        for k, m in enumerate(frame["messages"].to_list()):
            try:
                turns.append(templates.check_turns(m))
            except ValueError as err:
                raise ValueError(f"{path}: row {k + 1}: {err}") from None
        frame = frame.with_columns(pl.Series("instruction", [templates.conversation_text(t) for t in turns],
                                             dtype=pl.String))
    if "instruction" not in frame.columns:
        raise ValueError(f"{path}: prompt files need an 'instruction' (or 'messages') column (found {frame.columns})")
    if "input" in frame.columns:
        frame = frame.with_columns(
            pl.when(pl.col("input").fill_null("").str.strip_chars() != "")
            .then(pl.col("instruction") + "\n" + pl.col("input"))
            .otherwise(pl.col("instruction")).alias("instruction"))
    return frame


@task(name="sample")
def sample_prompts(prompts_path: str, warehouse: str, pipeline_name: str, n: int, out_file: str) -> dict:
    """Take the next `n` instructions this pipeline has never generated for, in file order.

    "Never" spans every run of the pipeline, scheduled rounds included: the warehouse's
    `generations` table remembers what each run already used, under the pipeline's exact name
    (pipeline `name-v2` or `name_x` never shares what `name` used).
    """
    frame = read_prompts(prompts_path).with_row_index("prompt_index")
    if "messages" in frame.columns:
        raise ValueError(f"{prompts_path}: online prompts are instructions; multi-turn `messages` prompts are read "
                         "for evaluation (heldout) only, not yet generated for online: use an 'instruction' column")
    con = wh.connect(warehouse)
    try:
        used = wh.used_instructions(con, pipeline_name)
    finally:
        con.close()
    fresh = frame.filter(~pl.col("instruction").is_in(pl.Series(used, dtype=pl.String).implode())).head(n)
    if fresh.height < n:
        raise ValueError(
            f"{prompts_path} has {fresh.height} instructions that {pipeline_name} never used; this iteration "
            f"needs {n} (instructions are never reused). Add instructions or lower online.prompts_per_iteration.")
    fresh.select("prompt_index", "instruction").write_parquet(out_file)
    return {"path": out_file, "n": fresh.height}


@task(name="generate")
def generate_responses(model_path: str, sampled_path: str, warehouse: str, run: str, iteration: int,
                       generation_json: str, out_file: str, template: str = "alpaca",
                       pipeline_name: str | None = None) -> dict:
    """Generate this iteration's responses with the declared engine (Generation section) from
    `model_path`, and record them under `run` and `pipeline_name` with the engine named
    (sample_prompts matches the pipeline's name exactly)."""
    from tasks.label import resolve_secret

    logger = get_run_logger()
    spec = Generation.model_validate_json(generation_json)
    prompts = pl.read_parquet(sampled_path)
    started = time.perf_counter()
    answers = engines.generate(spec, model_path, prompts["instruction"].to_list(), template=template,
                               api_key=engines.resolve_key(spec, resolve_secret))
    seconds = time.perf_counter() - started
    responses = [a[0] for a in answers]  # online rounds generate one response per instruction (dsl)
    frame = prompts.select("prompt_index", "instruction").with_columns(pl.Series("response", responses))
    frame.write_parquet(out_file)
    engine = engines.engine_name(spec)
    con = wh.connect(warehouse)
    try:
        wh.replace_generations(con, frame.to_arrow(), run=run, iteration=iteration, model=model_path,
                               pipeline=pipeline_name, engine=engine)
    finally:
        con.close()
    logger.info(f"generated {frame.height} responses with {model_path} on engine {engine} in {seconds:.1f} s")
    return {"path": out_file, "n": frame.height, "engine": engine, "seconds": seconds}
