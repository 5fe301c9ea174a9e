"""Controllers of a GPT-2 pre-training run, behind one interface (:mod:`agents.controllers.base`).

| name             | method                                                                  | module          |
|------------------|-------------------------------------------------------------------------|-----------------|
| ``fixed``        | the configured schedule, untouched (the neutral action)                 | schedules       |
| ``rule``         | ablation A: fixed rules on the uncertainty index                        | schedules       |
| ``zclip``        | ZClip adaptive gradient clipping throughout                             | clipping        |
| ``arc``          | Adaptive Robust Clipping over micro-batch shards throughout             | clipping        |
| ``spam``         | SPAM: periodic momentum resets + LR warm-up + spike-aware clipping      | spam            |
| ``hd``           | Adam-HD hypergradient descent on the learning rate                      | hypergradient   |
| ``skip_step``    | OLMo-core skip-step AdamW: no update on a loss/grad-norm outlier step   | skip_step       |
| ``stable_adamw`` | StableAdamW: AdamW with per-tensor AdaFactor-style update clipping      | stable_adamw    |
| ``pbt``          | population based training over forks (exploit / explore)                | pbt             |
| ``stso``         | the branch orchestrator on index triggers (full method, ablation C)     | branching       |
| ``proxy_only``   | ablation B: the proxy's best candidate, no verification                 | branching       |
| ``single_trigger``| ablation D: full method triggered by loss volatility alone             | branching       |
| ``policy``       | a learned policy loaded from ``policy.zip``                             | learned         |
| ``tuned_fixed``  | the fixed schedule at the best LR of a small sweep (validation split)   | tuned           |
| ``oracle``       | hindsight oracle: forks every intervention, keeps the best (no budget)  | oracle          |
| ``scripted``     | a given plan of actions by window, the neutral action elsewhere         | scripted        |

Each method's paper is in ``assets/related_work.md`` under the key its class docstring cites
(zclip 2025_Kumar_ZClip, arc 2025_Allouah_ARC, spam 2025_Huang_SPAM, hd 2018_Baydin_HD,
skip_step 2024_OLMo_OLMo2, stable_adamw 2023_Wortsman_StableAdamW, pbt 2017_Jaderberg_PBT,
learned policies 2017_Schulman_PPO and 2020_Huang_InvalidActionMasking).

``make_controller(name, ...)`` builds one by name; methods that need a proxy
artefact or a policy file get ``proxy_dir`` / ``policy_path``; ``tuned_fixed`` caches its LR
sweep in ``tuning_dir``.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from agents.controllers.base import Controller

CONTROLLERS: dict[str, tuple[str, str]] = {
    "fixed": ("agents.controllers.schedules", "FixedSchedule"),
    "rule": ("agents.controllers.schedules", "RuleBased"),
    "zclip": ("agents.controllers.clipping", "ZClipController"),
    "arc": ("agents.controllers.clipping", "ARCController"),
    "spam": ("agents.controllers.spam", "SPAMController"),
    "hd": ("agents.controllers.hypergradient", "AdamHD"),
    "skip_step": ("agents.controllers.skip_step", "SkipStep"),
    "stable_adamw": ("agents.controllers.stable_adamw", "StableAdamW"),
    "pbt": ("agents.controllers.pbt", "PBT"),
    "stso": ("agents.controllers.branching", "BranchController"),
    "proxy_only": ("agents.controllers.branching", "ProxyOnly"),
    "single_trigger": ("agents.controllers.branching", "SingleIndicator"),
    "policy": ("agents.controllers.learned", "LearnedPolicy"),
    "tuned_fixed": ("agents.controllers.tuned", "TunedFixed"),
    "oracle": ("agents.controllers.oracle", "Oracle"),
    "scripted": ("agents.controllers.scripted", "ScriptedPlan"),
}


def controller_class(name: str) -> type[Controller]:
    """The class registered under ``name``; an unknown name is a clear error."""
    if name not in CONTROLLERS:
        raise ValueError(f"controller {name!r} is unknown; choose from {', '.join(CONTROLLERS)}")
    module, cls = CONTROLLERS[name]
    return getattr(importlib.import_module(module), cls)


def make_controller(name: str, *, settings: dict[str, Any] | None = None, **resources: Any) -> Controller:
    """Build controller ``name`` with its ``settings`` (constructor keywords) and whichever of the
    shared ``resources`` (``proxy_dir``, ``policy_path``, ``branch_dir``, ``ray_address``) its constructor takes."""
    cls = controller_class(name)
    params = inspect.signature(cls.__init__).parameters
    settings = dict(settings or {})
    # a setting given explicitly wins over the shared resource of the same name (e.g. ray_address)
    kwargs = {k: v for k, v in resources.items() if k in params and v is not None and k not in settings}
    unknown = sorted(k for k in settings if k not in params)
    if unknown:
        allowed = [p for p in params if p not in ("self", "proxy_dir", "policy_path", "branch_dir", "ray_address")]
        raise ValueError(f"controller {name!r}: unknown setting(s) {unknown}; allowed: {allowed}")
    return cls(**kwargs, **settings)


__all__ = ["CONTROLLERS", "Controller", "controller_class", "make_controller"]
