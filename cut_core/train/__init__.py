"""Training: the CUT loss, the trainer, the training subprocess (`python -m cut_core.train.cli`),
its launcher, and TRL's DPO for the baselines."""
