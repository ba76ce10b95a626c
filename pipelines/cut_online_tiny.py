"""CUT on the released CUT-online iteration-1 triplets, with a tiny local model: the whole
offline path (ingest -> materialize -> train -> merge -> register) in a couple of minutes on a CPU.

The released file holds 47 failed judge calls (`$ERROR$`); ingestion quarantines them.
"""

from cut_core.dsl import CUT, LoRA, Model, Pipeline, Source, Training

pipeline = Pipeline(
    name="cut-online-tiny",
    workdir="../work/cut-online-tiny",
    sources=[Source(paths=["../../shared/data/cut-online/iter1.json"])],
    model=Model(path="../work/tiny-model", build="cut_core.models.tiny:make_tiny_model", max_length=512),
    objective=CUT(threshold=1.1, alpha=1.0),
    adapter=LoRA(r=16, alpha=16, dropout=0.05),
    training=Training(learning_rate=1e-3, epochs=1, micro_batch_size=4, gradient_accumulation=2,
                      warmup_steps=5, save_steps=50),
)
