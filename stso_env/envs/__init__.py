"""Gymnasium environments: STSO-GPT2-v0 (real training)."""

from stso_env.envs.gpt2_env import GPT2Env

__all__ = ["GPT2Env"]
