"""Gymnasium environments: STSO-GPT2-v0 and STSO-T5-v0 (real training), STSO-Proxy-v0 (the learned
model of training), STSO-RLHF-v0 (a real RLHF fine-tune)."""

from stso_env.envs.gpt2_env import GPT2Env
from stso_env.envs.t5_env import T5Env

__all__ = ["GPT2Env", "T5Env"]
