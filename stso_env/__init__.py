"""STSO: observable and steerable GPT-2 training.

Importing the package registers the Gymnasium environments (gymnasium 1.x has
no entry-point plugins), so both ``import stso_env; gym.make("STSO-GPT2-v0")``
and ``gym.make("stso_env:STSO-GPT2-v0")`` work. Registration uses string entry
points, so ``import stso_env`` stays light.
"""

from __future__ import annotations

import os
import sys

import gymnasium as gym

__version__ = "0.1.0"

ENV_IDS = {"STSO-GPT2-v0": "stso_env.envs.gpt2_env:GPT2Env", "STSO-T5-v0": "stso_env.envs.t5_env:T5Env",
           "STSO-Proxy-v0": "stso_env.envs.proxy_env:ProxyEnv",
           "STSO-RLHF-v0": "stso_env.envs.rlhf_env:RLHFEnv"}

for _id, _entry in ENV_IDS.items():
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_entry)


def _torch_single_threaded_after_fork() -> None:
    # torch's CPU thread pool does not survive fork(): a forked child that runs a parallel op
    # after the parent did hangs for ever (gymnasium's AsyncVectorEnv forks by default on
    # Linux). One thread per forked worker avoids that and is what N workers on N cores want
    # anyway; spawn/forkserver workers keep torch's default.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_torch_single_threaded_after_fork)
