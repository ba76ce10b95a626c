"""Models: any causal LM (LoRA targets, inspection), real models from GGUF files, the tiny test
models, weight digests and the base + adapter lineage of a merged folder.

`Model(build="cut_core.models:smollm2_from_pypi")` names a function of this package: the names
below are its public face (declarations store them as text)."""

from cut_core.models.causal_lm import (MLP_BLOCKS, MLP_LEAVES, inspect_model, linear_module_names,  # noqa: F401
                                       lora_targets, max_positions, meta_model, mlp_targets)
from cut_core.models.gguf import (SMOLLM2_GGUF, SMOLLM2_INSTALL, SMOLLM2_PACKAGE, ModelBuildError,  # noqa: F401
                                  import_gguf, packaged_file, smollm2_from_pypi)
