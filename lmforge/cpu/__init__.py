"""The CPU runner: decode steps in numpy and C kernels for the models its allowlist admits (allowlist.py)."""
