"""`cut-align`: the command line.

    cut-align check PIPELINE.py            validate a declaration and print the resolved plan
    cut-align run PIPELINE.py              run it (online_align when it has iterations, else offline_align)
    cut-align run PIPELINE.py --round NAME one recurring round: from the champion, on data no earlier round used
    cut-align ingest PATH... --warehouse FILE [--map NAME=COLUMN ...] [--json]
    cut-align make-tiny-model OUT [--texts FILE]
    cut-align demo [--json]                the offline demo: online CUT on a verifiable task
    cut-align serve PIPELINE.py --cron "0 3 * * *"

Heavy libraries (torch, prefect, mlflow) are imported inside the commands that need them, so
`check` answers instantly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def objective_summary(o) -> str:
    """The objective's section as it is declared, with every setting it has (all it reads), e.g.
    `CUT(threshold=1.2, alpha=0.5, gamma=0.0, weighting='reference', align_p_ratio=0.25)`."""
    settings = ", ".join(f"{k}={v!r}" for k, v in o.model_dump(exclude={"name"}).items())
    note = o.note
    return f"{type(o).__name__}({settings})" + (f": {note}" if note else "")


def parse_map(items: list[str]) -> dict[str, str]:
    mapping = {}
    for item in items:
        name, sep, column = item.partition("=")
        if not sep or not name or not column:
            raise SystemExit(f"--map expects NAME=COLUMN (e.g. --map instruction=question), got {item!r}")
        mapping[name.strip()] = column.strip()
    return mapping


def load(path: str):
    from cut_core.dsl import PipelineError, load_pipeline
    try:
        return load_pipeline(path)
    except PipelineError as err:
        raise SystemExit(f"error: {err}") from None


def describe(pipeline) -> str:
    """The resolved plan a person reads before running anything."""
    p = pipeline
    lines = [f"pipeline {p.name}", f"  workdir     {p.workdir}"]
    for i, s in enumerate(p.sources):
        lines.append(f"  source[{i}]   {', '.join(s.paths)} ({s.format}; map {s.columns or 'canonical'}; "
                     f"{'labeled' if s.labeled else 'unlabeled'})")
    if p.model:
        lines.append(f"  model       {p.model.path} (template {p.model.template}, max_length {p.model.max_length}"
                     + (f", built by {p.model.build}" if p.model.build else "") + ")")
    if p.judge:
        lines.append(f"  judge       {p.judge.kind}: " + json.dumps(p.judge.model_dump(exclude={'kind', 'system_prompt', 'user_prompt', 'prompt'})))
    lines.append(f"  objective   {objective_summary(p.objective)}")
    lines.append("  adapter     " + ("full fine-tune" if p.training.full_finetune else
                                     f"LoRA r={p.adapter.r} alpha={p.adapter.alpha} on {p.adapter.target_modules}"))
    from cut_core.train.launch import describe as describe_launch

    t = p.training
    lines.append(f"  launch      {describe_launch(p.launch)}")
    lines.append(f"  training    lr {t.learning_rate}, {t.epochs} epoch(s), batch {t.micro_batch_size}x{t.gradient_accumulation}, "
                 f"{t.scheduler} schedule, warmup {t.warmup_steps}, seed {t.seed}")
    if p.online.iterations:
        lines.append(f"  online      {p.online.iterations} iteration(s) x {p.online.prompts_per_iteration} new "
                     f"instructions from {p.online.prompts}")
        stages = "evaluate base, then per iteration: sample -> generate -> judge -> materialize -> train -> merge -> evaluate -> register"
    else:
        stages = "ingest -> label unlabeled -> materialize -> train -> evaluate -> register"
    if p.evaluation.heldout:
        lines.append(f"  evaluation  {p.evaluation.max_prompts} held-out prompts from {p.evaluation.heldout}; "
                     f"champion metric {p.evaluation.champion_metric}")
    lines.append(f"  flow        {'online-align' if p.online.iterations else 'offline-align'}: {stages}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- commands

def missing_extra(pipeline) -> str | None:
    """What the declaration needs that this install lacks (the TRL extra for dpo/ilf_dpo)."""
    from cut_core.train.dpo import INSTALL_HINT, require_trl

    if pipeline.objective.preference_pairs:
        try:
            require_trl()
        except ImportError:
            return INSTALL_HINT
    return None


def preflight(pipeline) -> list[str]:
    """Everything that can be known wrong before any work, each one line (cause + fix): a missing
    extra, the model folder (config and tokenizer only: see cut_core.models.inspect_model), the
    accelerate config file. Imports neither prefect nor the model's weights."""
    problems = []
    missing = missing_extra(pipeline)
    if missing:
        problems.append(missing)
    if pipeline.model is not None:
        from cut_core.models import inspect_model

        lora = None if pipeline.training.full_finetune or pipeline.adapter is None else pipeline.adapter.target_modules
        problems += inspect_model(pipeline.model.path, template=pipeline.model.template,
                                  max_length=pipeline.model.max_length, lora_spec=lora,
                                  can_build=bool(pipeline.model.build))
    config = pipeline.launch.accelerate_config
    if config and not Path(config).is_file():
        problems.append(f"launch.accelerate_config {config} does not exist; fix: point it at an accelerate config "
                        "file (pipelines/accelerate/ has DDP, FSDP2 and DeepSpeed ZeRO-2 ones)")
    return problems


def report_problems(problems: list[str]) -> int:
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 2 if problems else 0


def cmd_check(args) -> int:
    pipeline = load(args.pipeline)
    print(describe(pipeline))
    if report_problems(preflight(pipeline)):
        return 2
    print("ok: the declaration is valid")
    return 0


def cmd_run(args) -> int:
    pipeline = load(args.pipeline)
    if report_problems(preflight(pipeline)):  # before any server, ingest or generation
        return 2
    from cut_core.errors import UserError, one_line

    quiet_user_errors(Path(pipeline.workdir) / "cut-align.log")
    from flows.align import run_pipeline
    try:
        result = run_pipeline(pipeline, round_name=args.round)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=str))
    return 0


def quiet_user_errors(log_file: Path) -> None:
    """A UserError is logged as its one line, without the engine's traceback (the CLI prints the
    line; the cause is the user's input, not the code). Everything Prefect logs also goes to
    `log_file`, with the full traceback of every real crash."""
    import logging

    from prefect.logging import configuration

    from cut_core.errors import UserError

    if not configuration.PROCESS_LOGGING_CONFIG:  # Prefect's first set-up replaces handlers; later ones add
        configuration.setup_logging()

    make_record = logging.getLogRecordFactory()

    def without_user_error_traceback(*args, **kwargs):
        record = make_record(*args, **kwargs)
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info, record.exc_text = None, None
        return record

    # Once per process, once per file: a second run in the same process (a notebook, a test, a
    # worker) must not stack another factory or write every line to the log twice.
    if not getattr(logging.getLogRecordFactory(), "strips_user_errors", False):
        without_user_error_traceback.strips_user_errors = True
        logging.setLogRecordFactory(without_user_error_traceback)
    prefect_logger = logging.getLogger("prefect")
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(log_file)
           for h in prefect_logger.handlers):
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    prefect_logger.addHandler(to_file)


def cmd_ingest(args) -> int:
    # The inputs are checked before Prefect is even imported (its temporary server starts with
    # the first flow run): a missing file or an unknown format is one line, no traceback.
    from pydantic import ValidationError

    from cut_core.dsl import Source
    from cut_core.data.ingest.report import IngestError, RejectRateExceeded
    from cut_core.data.ingest.sources import check_sources
    from cut_core.data.warehouse import WarehouseBusy
    try:
        check_sources([Source(paths=list(args.paths), columns=parse_map(args.map), delimiter=args.delimiter,
                              format=args.format)])
    except IngestError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValidationError as err:
        print(f"error: {err.errors()[0]['msg']} ({', '.join(map(str, err.errors()[0]['loc']))})", file=sys.stderr)
        return 2
    if Path(args.warehouse).is_dir():
        print(f"error: --warehouse {args.warehouse} is a folder; name a DuckDB file such as "
              f"{Path(args.warehouse) / 'warehouse.duckdb'}", file=sys.stderr)
        return 2
    from flows.ingest import run_ingest
    try:
        report = run_ingest(args.paths, args.warehouse, parse_map(args.map), args.max_reject_rate,
                            use_prefect=not args.no_prefect, max_record_bytes=args.max_record_bytes,
                            delimiter=args.delimiter, format=args.format, score_threshold=args.score_threshold)
        status = 0
    except RejectRateExceeded as err:
        report, status = err.report, 2
        print(f"error: {err}", file=sys.stderr)
    except (IngestError, WarehouseBusy) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if "Prefect API server" not in str(err):
            raise
        print(f"error: {err} (the machine may be too busy for Prefect's temporary server; retry, or ingest "
              "without a flow run with --no-prefect)", file=sys.stderr)
        return 2
    print(f"rows read {report['rows_read']}, accepted {report['accepted']} "
          f"({report['positives']} positive, {report['negatives']} negative, {report.get('unlabeled', 0)} unlabeled), "
          f"rejected {report['rejected']} {report['rejected_by_reason']}")
    if args.json:
        print(json.dumps(report, default=str))
    return status


def cmd_make_tiny_model(args) -> int:
    from cut_core.models.tiny import make_tiny_model
    texts = Path(args.texts).read_text().splitlines() if args.texts else None
    out = make_tiny_model(args.out, texts)
    print(f"tiny model and tokenizer saved to {out}")
    return 0


def cmd_demo(args) -> int:
    from flows.demo import run_demo
    return run_demo(workdir=args.workdir, as_json=args.json)


def cmd_serve(args) -> int:
    pipeline = load(args.pipeline)
    from flows.serve import serve
    serve(pipeline, cron=args.cron)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cut-align", description="Align language models with judgments (CUT).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="validate a pipeline declaration and print the resolved plan")
    p.add_argument("pipeline")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("run", help="run a pipeline declaration")
    p.add_argument("pipeline")
    p.add_argument("--round", metavar="NAME", default=None,
                   help="run one recurring round named NAME (e.g. a date): it starts from the registered "
                        "champion and trains only on data no earlier round of this pipeline used (offline: "
                        "new triplets; online: new instructions); rerunning a finished round does nothing")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ingest", help="ingest and validate triplet files into a DuckDB warehouse")
    p.add_argument("paths", nargs="+", help="files or globs (JSONL, JSON array, Parquet, CSV, Arrow); with "
                   "--format hf also `datasets` folders (save_to_disk, or hub-layout Parquet shards)")
    p.add_argument("--warehouse", default="work/warehouse.duckdb", help="DuckDB file (created if missing)")
    p.add_argument("--map", action="append", default=[], metavar="NAME=COLUMN",
                   help="map a canonical column to the file's column, e.g. --map instruction=question; COLUMN may "
                   "be a path into nested JSON: keys joined by '.', key[N] for element N, key[*] for every element "
                   "(one triplet per element), e.g. --map response='completions[*].response'")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "json", "parquet", "csv", "arrow", "hf"],
                   help="file format (default: by extension); hf: Hugging Face `datasets` folders")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="rows whose `score` column (--map score=...) is at least this are positive")
    p.add_argument("--max-reject-rate", type=float, default=0.10, help="fail above this rejected fraction")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    p.add_argument("--no-prefect", action="store_true", help="run the library directly, without a Prefect flow run")
    p.add_argument("--max-record-bytes", type=int, default=None,
                   help="reject records longer than this many bytes as oversized (default 8 MiB)")
    p.add_argument("--delimiter", default=None, help="CSV delimiter (default: tab for .tsv, else a comma)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("make-tiny-model", help="build a tiny Llama and tokenizer locally")
    p.add_argument("out")
    p.add_argument("--texts", help="text file (one text per line) to train the tokenizer on")
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("demo", help="run the offline demo: online CUT on a verifiable arithmetic task")
    p.add_argument("--workdir", default="work/demo")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="serve a scheduled deployment of a pipeline (needs `prefect server start`); "
                       "its runs run this declaration, with at most iterations / prompts_per_iteration overridden")
    p.add_argument("pipeline")
    p.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * *"')
    p.set_defaults(func=cmd_serve)

    args = parser.parse_args(argv)
    # Prefect's temporary server gets 20 s to come up by default: too little on a busy 2-core
    # machine (measured: 20-65 s at load 15), where the user would read a start-up timeout.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if getattr(args, "json", False):
        # --json promises the JSON object is the last line: keep Prefect's INFO chatter
        # (e.g. "Stopping temporary server" at exit) out of the output.
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
