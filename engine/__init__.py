"""Training engine: the loop, evaluation, checkpoints, distributed helpers, metrics and logging."""
