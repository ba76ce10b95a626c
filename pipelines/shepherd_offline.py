"""Offline CUT on the Shepherd human critiques (the paper's offline setting, METHOD.md §6).

Every Shepherd record is a negative judgment; its columns are question/answer/feedback.
Point CUT_ALIGN_MODEL at a local Hugging Face causal LM directory (e.g. a LLaMA-2 checkout).
"""

import os

from cut_core.dsl import CUT, LoRA, Model, Pipeline, Source, Training

pipeline = Pipeline(
    name="shepherd-offline",
    workdir="../work/shepherd-offline",
    sources=[Source(
        paths=["../../shared/data/shepherd/human_data_for_model.jsonl"],
        columns={"instruction": "question", "response": "answer", "judgment": "feedback"},
    )],
    model=Model(path=os.environ.get("CUT_ALIGN_MODEL", "models/llama-2-13b"), max_length=2048),
    objective=CUT(threshold=1.2, alpha=0.5),   # the paper's offline settings
    adapter=LoRA(r=16, alpha=16, dropout=0.05),
    training=Training(learning_rate=4e-4, epochs=1, micro_batch_size=1, gradient_accumulation=8,
                      warmup_steps=100, seed=42),
)
