"""Fine-tuning: supervised and instruction tuning of a run, fully or through a parameter-efficient method."""
