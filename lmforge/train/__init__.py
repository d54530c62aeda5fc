"""Pre-training: the loop, optimizers, schedules."""
