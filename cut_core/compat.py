"""Module paths of the flat layout (before cut_core had one folder per concern), and where each went.

Declarations store `module:function` strings (FunctionJudge.callable, Model.build, refiners), and a
run's key is a digest of the declaration: an old declaration keeps its strings, so it keeps its run
key and resumes; `dsl.import_callable` resolves an old path through this table. A function judge is
named by its current path (`current_callable`), and judge names stored in a warehouse's judgment
cache under an old path are renamed when the warehouse opens (data.warehouse
`migrate_moved_judge_names`), so an old warehouse's cached judgments are found again.
"""

MOVED = {
    "cut_core.warehouse": "cut_core.data.warehouse",
    "cut_core.ingest": "cut_core.data.ingest",
    "cut_core.polarity": "cut_core.data.polarity",
    "cut_core.templates": "cut_core.data.templates",
    "cut_core.sequences": "cut_core.data.sequences",
    "cut_core.contrast": "cut_core.data.contrast",
    "cut_core.preference": "cut_core.data.preference",
    "cut_core.loss": "cut_core.train.loss",
    "cut_core.trainer": "cut_core.train.trainer",
    "cut_core.train_cli": "cut_core.train.cli",
    "cut_core.launch": "cut_core.train.launch",
    "cut_core.dpo": "cut_core.train.dpo",
    "cut_core.judges": "cut_core.judge",
    "cut_core.generate": "cut_core.infer.generate",
    "cut_core.evaluate": "cut_core.infer.evaluate",
    "cut_core.report": "cut_core.infer.report",
    "cut_core.engines": "cut_core.infer.engines",
    "cut_core.vllm_worker": "cut_core.infer.vllm_worker",
    "cut_core.refine": "cut_core.infer.refine",
    "cut_core.tiny": "cut_core.models.tiny",
    "cut_core.weights": "cut_core.models.weights",
    "cut_core.lineage": "cut_core.models.lineage",
    "cut_core.demo_task": "cut_core.tasks.arithmetic",
    "cut_core.constraints_task": "cut_core.tasks.constraints",
}


def current_module(module: str) -> str:
    """The module a (possibly old) module path names today."""
    return MOVED.get(module, module)


def current_callable(spec: str) -> str:
    """A 'module:function' string with its module as it is named today."""
    module, sep, attr = spec.partition(":")
    return current_module(module) + sep + attr
