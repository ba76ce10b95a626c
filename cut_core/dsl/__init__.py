"""The pipeline DSL: a pipeline is a Python file that builds one `Pipeline` object.

Every section is a pydantic model with `extra="forbid"`, so a typo is an error, and every
field carries a description that doubles as the fix-it hint in load-time errors. A
declaration round-trips through JSON unchanged: it becomes Prefect flow parameters and MLflow
params as-is.

    from cut_core.dsl import *
    pipeline = Pipeline(
        name="shepherd-offline",
        sources=[Source(paths=["../shared/data/shepherd/*.jsonl"],
                        columns={"instruction": "question", "response": "answer",
                                 "judgment": "feedback"})],
        model=Model(path="models/my-llama"),
        objective=CUT(threshold=1.2, alpha=0.5),
    )

The objective is one section per method (CUT, SFT, Hindsight, ForwardPrediction, ILFMLE, DPO,
ILFDPO, SelfDistill), chosen by its `name` as judges are by `kind`; each holds only what its
method reads. `Objective(name=..., ...)`, the one class it replaced, still builds the section.
"""

from __future__ import annotations

# One module per group of sections (base, data, judges, objectives, training, runs, pipeline,
# loading); a declaration imports them all from here: `from cut_core.dsl import *`.
from cut_core.dsl.base import *  # noqa: F401,F403
from cut_core.dsl.data import *  # noqa: F401,F403
from cut_core.dsl.judges import *  # noqa: F401,F403
from cut_core.dsl.objectives import *  # noqa: F401,F403
from cut_core.dsl.training import *  # noqa: F401,F403
from cut_core.dsl.runs import *  # noqa: F401,F403
from cut_core.dsl.pipeline import *  # noqa: F401,F403
from cut_core.dsl.loading import *  # noqa: F401,F403
