"""RLHF preparation."""
