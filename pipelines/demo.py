"""The demo: online CUT on a verifiable task, on a laptop CPU, with no network.

A tiny Llama is built and warm-started locally (cut_core.tasks.arithmetic.build_base_model) so that it
adds 2-digit numbers but often drops the carry. Each online iteration it answers 500 new
problems; a Python verifier writes a judgment naming the wrong digit and why; CUT trains on
the triplets; the merged model is evaluated on 500 held-out problems and answers the next
iteration. `cut-align demo` runs this declaration and prints the accuracy table.
"""

from cut_core.dsl import CUT, Evaluation, FunctionJudge, Model, Online, Pipeline, Training

pipeline = Pipeline(
    name="arithmetic-demo",
    workdir="../work/demo",
    model=Model(path="../work/demo/base-model", build="cut_core.tasks.arithmetic:build_base_model", max_length=128),
    judge=FunctionJudge(callable="cut_core.tasks.arithmetic:judge"),
    objective=CUT(threshold=1.1, alpha=1.0, align_p_ratio=0.25),   # the paper's online settings
    adapter=None,
    training=Training(full_finetune=True, learning_rate=1e-5, epochs=1, micro_batch_size=16,
                      gradient_accumulation=1, scheduler="constant", warmup_steps=0, save_steps=1000,
                      logging_steps=5, seed=42),
    online=Online(iterations=3, prompts="../datasets/arithmetic/online.jsonl", prompts_per_iteration=500,
                  max_new_tokens=6, generation_batch_size=100),
    evaluation=Evaluation(heldout="../datasets/arithmetic/heldout.jsonl", max_prompts=500, max_new_tokens=6,
                          samples=20, champion_metric="positive_rate"),
)
