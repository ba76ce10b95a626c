"""The ILF-DPO baseline on the Shepherd critiques, to compare with shepherd_offline.py (CUT).

Shepherd has no corrected answers, so the model being aligned writes each refinement from
(question, answer, critique) with the refine template (METHOD.md §1); TRL's DPOTrainer then
prefers the refinement over the original answer. Needs the `dpo` extra:
`pip install 'cut-align[dpo]'`. Point CUT_ALIGN_MODEL at a local Hugging Face causal LM folder.
"""

import os

from cut_core.dsl import ILFDPO, LoRA, Model, Pipeline, Source, Training

pipeline = Pipeline(
    name="shepherd-ilf-dpo",
    workdir="../work/shepherd-offline",   # shares the warehouse with the CUT run: one ingest
    sources=[Source(
        paths=["../../shared/data/shepherd/human_data_for_model.jsonl"],
        columns={"instruction": "question", "response": "answer", "judgment": "feedback"},
    )],
    model=Model(path=os.environ.get("CUT_ALIGN_MODEL", "models/llama-2-13b"), max_length=2048),
    objective=ILFDPO(refiner="model", refine_max_new_tokens=512, beta=0.1),
    adapter=LoRA(r=16, alpha=16, dropout=0.05),
    training=Training(learning_rate=5e-5, epochs=1, micro_batch_size=1, gradient_accumulation=8,
                      warmup_steps=100, seed=42),
)
