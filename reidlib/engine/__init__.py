"""Training engine: LR schedules, checkpoints and the stage loops."""
