"""Alignment (`lmforge align`): reward models, DPO and its relatives, PPO-based RLHF, GRPO with verifiable rewards."""
