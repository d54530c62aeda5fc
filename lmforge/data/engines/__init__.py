"""Engines that run one function over a list of shard tasks: local processes or a Ray cluster."""
