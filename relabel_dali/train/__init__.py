"""Training: the epoch loop (``engine``), models, optimizers and schedule, losses, metrics, CutMix,
checkpoints and distributed set-up. The top of the one-way stack: imports the data path, nothing
imports it but ``train.py``."""
