"""Evaluation: tasks from YAML files scored on a run in-process or on an OpenAI-compatible server (`lmforge eval`)."""
