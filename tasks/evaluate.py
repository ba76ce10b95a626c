"""The evaluate task: held-out judge positive rate (accuracy for a verifier), NLL of the
references, flagged-token rate, sample generations and the token-level HTML report."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from cut_core.infer import engines
from cut_core.data import templates
from cut_core.dsl import Pipeline
from cut_core.infer.evaluate import EvaluationRefused, evaluate
from cut_core.infer.generate import load_model
from cut_core.infer.report import flag_report_html
from tasks.generate import read_prompts
from tasks.label import pipeline_judge, resolve_secret


def samples_markdown(samples: list[dict], limit: int = 10) -> str:
    def cell(text) -> str:
        return ("" if text is None else str(text)).replace("|", "\\|").replace("\n", " ")[:160]
    rows = ["| instruction | response | judgment |", "|---|---|---|"]
    rows += [f"| {cell(s.get('instruction'))} | {cell(s.get('response'))} | {cell(s.get('judgment') or 'positive')} |"
             for s in samples[:limit]]
    return "\n".join(rows)


@task(name="evaluate")
def evaluate_model(pipeline: Pipeline, model_path: str, out_dir: str, label: str) -> dict:
    """Score `model_path` on the held-out prompts of `pipeline`; write metrics.json, samples.json,
    flags.html. Returns {"metrics", "dir"} (tasks/results.py Evaluated).

    Raises EvaluationRefused (after writing the files, so the failed calls can be read) when more
    than evaluation.max_failed_rate of the judge calls failed or fewer than evaluation.min_judged
    succeeded: such a model gets no score and cannot be promoted, and the stage stays unfinished,
    so a rerun evaluates again.
    """
    logger = get_run_logger()
    spec = pipeline.evaluation
    rows = read_prompts(spec.heldout).head(spec.max_prompts).to_dicts()
    generation = pipeline.generation
    max_new_tokens = spec.max_new_tokens or generation.max_new_tokens
    model, tokenizer = load_model(model_path)
    responses = None
    if generation.engine != "transformers":
        # Evaluation decodes greedily, one answer per prompt, on the declared engine; the model is
        # still loaded here to score (held-out NLL, token flags).
        instructions = [templates.format_instruction(r["instruction"], r.get("input")) for r in rows]
        responses = [a[0] for a in engines.generate(
            generation, model_path, instructions, template=pipeline.model.template, tokenizer=tokenizer,
            sampling=engines.Sampling(max_new_tokens=max_new_tokens),
            api_key=engines.resolve_key(generation, resolve_secret))]
        logger.info(f"{label}: {len(responses)} held-out answers from engine {engines.engine_name(generation)}")
    judge = pipeline_judge(pipeline)  # resolves a Prefect Secret API key when declared
    result = evaluate(model, tokenizer, rows, judge, max_new_tokens=max_new_tokens,
                      batch_size=generation.batch_size, samples=spec.samples, responses=responses,
                      threshold=pipeline.objective.flag_threshold(), template=pipeline.model.template,
                      max_length=pipeline.model.max_length, max_failed_rate=spec.max_failed_rate,
                      min_judged=spec.min_judged)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result["metrics"], indent=2))
    (out / "samples.json").write_text(json.dumps(result["samples"], indent=2, default=str))
    (out / "flags.html").write_text(flag_report_html(result.get("flag_samples", [])))
    metrics = result["metrics"]
    if result["refused"]:
        (out / "REFUSED").write_text(result["refused"] + "\n")
        raise EvaluationRefused(
            f"evaluation of {label} refused: {result['refused']}. No score and no promotion. Samples "
            f"with their judge errors are in {out / 'samples.json'}; fix the judge (or raise evaluation.max_failed_rate "
            "/ lower evaluation.min_judged) and rerun: finished stages are kept", metrics)
    logger.info(f"{label}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    create_markdown_artifact(
        key=f"evaluation-{label}".lower().replace("_", "-"),
        markdown=f"## Evaluation: {label}\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in metrics.items())
        + "\n\n### Samples\n\n" + samples_markdown(result["samples"]),
        description=f"held-out evaluation of {label}")
    return {"metrics": metrics, "dir": str(out)}
