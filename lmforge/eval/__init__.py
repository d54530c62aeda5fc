"""Evaluation: tasks, metrics and probes for a run or an OpenAI-compatible endpoint."""
