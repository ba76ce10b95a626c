"""The generate task: the current model answers this iteration's new instructions.

Instructions come from the pipeline's prompt file in order: iteration k takes rows
[(k-1)·n, k·n), so no instruction is ever used twice across iterations of a run.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from prefect import task
from prefect.logging import get_run_logger

from cut_core.generate import generate, load_model


def read_prompts(path: str) -> pl.DataFrame:
    """Prompt files are JSONL/JSON/Parquet/CSV with an `instruction` column (and optional `input`)."""
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
    if "instruction" not in frame.columns:
        raise ValueError(f"{path}: prompt files need an 'instruction' column (found {frame.columns})")
    if "input" in frame.columns:
        frame = frame.with_columns(
            pl.when(pl.col("input").fill_null("").str.strip_chars() != "")
            .then(pl.col("instruction") + "\n" + pl.col("input"))
            .otherwise(pl.col("instruction")).alias("instruction"))
    return frame


def iteration_prompts(path: str, iteration: int, per_iteration: int) -> pl.DataFrame:
    frame = read_prompts(path)
    start = (iteration - 1) * per_iteration
    if start + per_iteration > frame.height:
        raise ValueError(
            f"{path} holds {frame.height} instructions; iteration {iteration} needs rows "
            f"{start}..{start + per_iteration} (instructions are never reused). Add instructions "
            f"or lower online.prompts_per_iteration.")
    return frame.slice(start, per_iteration).with_row_index("prompt_index", offset=start)


@task(name="generate")
def generate_responses(model_path: str, prompts_path: str, iteration: int, per_iteration: int,
                       max_new_tokens: int, batch_size: int, greedy: bool, out_file: str) -> dict:
    logger = get_run_logger()
    prompts = iteration_prompts(prompts_path, iteration, per_iteration)
    model, tokenizer = load_model(model_path)
    responses = generate(model, tokenizer, prompts["instruction"].to_list(), max_new_tokens=max_new_tokens,
                         batch_size=batch_size, greedy=greedy)
    frame = prompts.select("prompt_index", "instruction").with_columns(pl.Series("response", responses))
    frame.write_parquet(out_file)
    logger.info(f"generated {frame.height} responses with {model_path}")
    return {"path": out_file, "n": frame.height}
