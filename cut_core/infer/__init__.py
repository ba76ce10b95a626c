"""Inference: generation (in process or on a serving engine), held-out evaluation, the token
report, and ILF refinements written by the model."""
