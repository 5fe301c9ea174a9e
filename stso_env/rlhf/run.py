"""One GRPO fine-tune of the prepared policy against the prepared reward model, steerable between windows.

:class:`RLHFRun` puts together what :mod:`stso_env.rlhf.prepare` built (policy and reward model
folders, preference prompts) and TRL's ``GRPOTrainer`` driven through
:class:`~stso_env.rlhf.bridge.SteppedGRPO`. Between windows of optimizer steps the caller sets
:class:`Knobs`; a ``TrainerCallback`` applies them at the points where TRL 1.16 reads them:

* ``lr_scale``: the LR of every parameter group is set to the scheduler's value times the
  scale in ``on_pre_optimizer_step``, after the scheduler has written its own value.
* ``beta``: ``trainer.beta``, read at every loss computation (GRPO), or when a generation's rewards
  are computed (RLOO, whose KL penalty is part of the reward).
* ``entropy_coef`` (GRPO only; ``RLOOTrainer`` has no entropy term): ``trainer.entropy_coef``; TRL
  decides at construction whether the entropy term exists at all (``entropy_coef != 0``), so the
  run switches it on with a coefficient of 0, which adds exactly nothing until a controller raises it.
* ``ref_alpha``: TRL's ``SyncRefModelCallback`` (``sync_ref_model=True``, every step) mixes the
  reference model towards the policy by ``args.ref_model_mixup_alpha`` at each step end; 0 keeps
  the reference frozen bit for bit.
* ``epsilon``: the PPO clip bound, ``trainer.epsilon_low`` / ``epsilon_high``. Each generation is
  used for ``num_iterations`` (2) optimizer steps, so the second step is off-policy and the clip
  matters (with one iteration the ratio is exactly 1).
* ``skip``: every optimizer step of the window is skipped. Zeroed gradients would still move
  Adam's moments; the callback sets every gradient to ``None`` in ``on_pre_optimizer_step``, which
  torch's AdamW treats as "no update" for that parameter: weights, moments and step counts stay.

Per step the trainer's logged metrics (``on_log``, ``logging_steps=1``) are collected; a window's
:class:`WindowStats` averages them. The probe gold score is the gold scorer's mean over greedy
completions of the fixed probe prompts (greedy: no sampling, so measuring it draws no random
numbers and does not perturb the run).
"""

from __future__ import annotations

import logging
import math
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stso_env.config import _f
from stso_env.rlhf.bridge import SteppedGRPO, stream_of
from stso_env.rlhf.gold import completion_score
from stso_env.rlhf.scenario import RLHFScenario

log = logging.getLogger(__name__)

#: The trainer's per-step log keys a window averages, under the names WindowStats uses.
LOG_KEYS = {"reward": "reward", "reward_std": "reward_std", "kl": "kl", "entropy": "entropy",
            "clip_ratio": "clip_ratio/region_mean", "grad_norm": "grad_norm",
            "completion_length": "completions/mean_length", "learning_rate": "learning_rate",
            "zero_std": "frac_reward_zero_std"}


@dataclass
class GRPOSettings:
    """The shape of a GRPO (or RLOO) run (what the scenario does not set)."""

    algorithm: str = _f("grpo", "TRL trainer: grpo (GRPOTrainer, KL in the loss) or rloo (RLOOTrainer, "
                        "REINFORCE leave-one-out with the KL in the reward; no entropy bonus)",
                        choices=("grpo", "rloo"))
    steps: int = _f(160, "optimizer steps of the run", range=(1, 10**7))
    prompts_per_step: int = _f(4, "prompts per generation batch", range=(1, 4096))
    num_generations: int = _f(4, "completions per prompt (GRPO's group size)", range=(2, 256))
    num_iterations: int = _f(2, "optimizer steps per generation batch (>1 makes the PPO clip act)",
                             range=(1, 16))
    max_completion_length: int = _f(40, "token budget of a sampled completion", range=(1, 4096))
    epsilon: float = _f(0.2, "PPO clip bound at the start", range=(0.0, 10.0))
    max_grad_norm: float = _f(1.0, "global gradient-norm clip", range=(0.0, 1e6))
    probe_prompts: int = _f(64, "probe prompts whose greedy completions give the gold score", range=(1, 10**6))
    probe_max_new_tokens: int = _f(40, "token budget of a probe completion", range=(1, 4096))

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.num_generations


#: The test size: seconds per run.
TINY_SETTINGS = dict(steps=16, prompts_per_step=2, num_generations=4, max_completion_length=16,
                     probe_prompts=8, probe_max_new_tokens=16)


@dataclass
class Knobs:
    """What a controller changes between windows (see the module docstring)."""

    lr_scale: float = 1.0
    beta: float = 0.04
    entropy_coef: float = 0.0
    ref_alpha: float = 0.0
    epsilon: float = 0.2
    skip: bool = False


@dataclass
class WindowStats:
    """Means over a window's optimizer steps of the trainer's metrics, and what the window did."""

    steps: int = 0
    skipped: int = 0
    reward: float = math.nan
    reward_std: float = math.nan
    kl: float = math.nan
    kl_max: float = math.nan
    entropy: float = math.nan
    clip_ratio: float = math.nan
    grad_norm: float = math.nan
    completion_length: float = math.nan
    learning_rate: float = math.nan
    zero_std: float = math.nan
    noisy_steps: int = 0
    per_step: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "per_step"}


class _Controls:
    """The TrainerCallback that applies :class:`Knobs` and collects the per-step logs."""

    def __init__(self, knobs: Knobs) -> None:
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                outer.pre_optimizer_step(kwargs)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:  # a training step's log (generation metrics only on generation steps)
                    outer.logs.append({k: float(logs[v]) for k, v in LOG_KEYS.items() if v in logs})

        self.callback = Callback()
        self.knobs = knobs
        self.trainer = None
        self.logs: list[dict[str, float]] = []
        self.skipped = 0

    def pre_optimizer_step(self, kwargs: dict[str, Any]) -> None:
        t = self.trainer
        for group, base in zip(t.optimizer.param_groups, t.lr_scheduler.get_last_lr()):
            group["lr"] = base * self.knobs.lr_scale
        if self.knobs.skip:
            for p in t.model.parameters():
                p.grad = None
            self.skipped += 1


class RLHFRun:
    """A GRPO run of ``settings.steps`` optimizer steps, advanced ``interval`` steps at a time.

    Args:
        policy_dir, reward_dir: folders of :func:`stso_env.rlhf.prepare.prepare`.
        train_prompts: the prompts GRPO samples from (the preference *train* split).
        probe_prompts: prompts whose greedy completions give :meth:`probe_gold` (the *probe* split).
        settings, scenario, seed, interval: the run's shape, its starting knobs and noise, its
            seed, and optimizer steps per :meth:`advance`.
        work_dir: the trainer's ``output_dir`` (nothing is saved there; a temporary folder if None).
    """

    def __init__(self, policy_dir: str | Path, reward_dir: str | Path, train_prompts: Sequence[str],
                 probe_prompts: Sequence[str], settings: GRPOSettings, scenario: RLHFScenario, seed: int,
                 interval: int, work_dir: str | Path | None = None) -> None:
        from transformers import AutoTokenizer, GPT2ForSequenceClassification
        from transformers.utils import logging as hf_logging
        from trl import GRPOConfig, RLOOConfig

        # a run (re)loads the policy from disk on every build and restore; the bar of each load, and
        # TRL 1.16 calling transformers' deprecated gradient_checkpointing names, would bury the env's output
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*", category=FutureWarning)
        self.settings, self.scenario, self.seed, self.interval = settings, scenario, int(seed), interval
        self.tokenizer = AutoTokenizer.from_pretrained(str(policy_dir), local_files_only=True)
        self.reward_model = GPT2ForSequenceClassification.from_pretrained(str(reward_dir), local_files_only=True)
        self.reward_model.eval()
        self.probe_prompts = list(probe_prompts)[: settings.probe_prompts]
        self._tmp = None
        if work_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="stso-grpo-")
            work_dir = self._tmp.name
        self.knobs = Knobs(beta=scenario.beta, epsilon=settings.epsilon)
        self._controls = _Controls(self.knobs)
        self._noisy = 0
        self._policy_dir, self._train_prompts = str(policy_dir), list(train_prompts)
        config_cls = GRPOConfig if settings.algorithm == "grpo" else RLOOConfig
        self._args = config_cls(
            # the trainer's own budget is twice the run's, so a run restored to an earlier step can go on
            output_dir=str(work_dir), use_cpu=True, bf16=False, report_to="none", disable_tqdm=True,
            save_strategy="no", logging_steps=1, seed=self.seed, max_steps=2 * settings.steps,
            per_device_train_batch_size=settings.batch_size, num_generations=settings.num_generations,
            num_iterations=settings.num_iterations, max_completion_length=settings.max_completion_length,
            learning_rate=scenario.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            beta=scenario.beta, temperature=scenario.temperature, epsilon=settings.epsilon,
            max_grad_norm=settings.max_grad_norm, sync_ref_model=True, ref_model_sync_steps=1,
            ref_model_mixup_alpha=0.0)
        self.stepped = self._make_stepped()

    def _make_stepped(self) -> SteppedGRPO:
        """A fresh trainer on the prepared policy, paused before its first step."""
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        stepped = SteppedGRPO(stream_of(self._train_prompts, seed=self.seed), interval=self.interval,
                              algorithm=self.settings.algorithm, model=self._policy_dir,
                              reward_funcs=self._proxy_reward, args=self._args, processing_class=self.tokenizer,
                              callbacks=[self._controls.callback])
        t = stepped.trainer
        for cb in (PrinterCallback, ProgressCallback):  # the env reports; the trainer's own printing is noise
            t.remove_callback(cb)
        self._controls.trainer = t
        if self.settings.algorithm == "grpo":
            t._entropy_bonus_enabled = True  # the term exists from the start, with coefficient 0 (module docstring)
            t.entropy_coef = 0.0
        stepped.start()
        return stepped

    # ------------------------------------------------------------------ reward

    def _proxy_reward(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        """The reward model's score of prompt + completion, plus the scenario's noise."""
        from stso_env.rlhf.prepare import reward_scores

        scores = reward_scores(self.reward_model, self.tokenizer, [p + c for p, c in zip(prompts, completions)])
        t = self.stepped.trainer
        groups_per_generation = self.settings.prompts_per_step
        generation = t.cursor // groups_per_generation - 1  # the cursor has moved past this batch's groups
        noise = self.scenario.reward_noise.sample(self.seed, generation, generation * self.settings.num_iterations,
                                                  len(scores))
        self._noisy += int(np.any(noise != 0))
        return (scores + noise).astype(float).tolist()

    # ------------------------------------------------------------------ stepping

    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return self.stepped.step

    @property
    def finished(self) -> bool:
        return self.stepped.finished or self.stepped.step >= self.settings.steps

    def apply_knobs(self) -> None:
        """Write :attr:`knobs` into the paused trainer (the LR and skip act through the callback)."""
        t, k = self.stepped.trainer, self.knobs
        t.beta = float(k.beta)
        if self.settings.algorithm == "grpo":  # RLOOTrainer has no entropy term (the env masks the bonus)
            t.entropy_coef = float(k.entropy_coef)
        t.epsilon_low = t.epsilon_high = float(k.epsilon)
        t.args.ref_model_mixup_alpha = float(k.ref_alpha)

    def advance(self) -> WindowStats:
        """Run the next window under :attr:`knobs`; returns its statistics."""
        if self.finished:
            raise RuntimeError(f"the run has finished ({self.settings.steps} optimizer steps)")
        self.apply_knobs()
        c = self._controls
        c.logs, c.skipped = [], 0
        noisy_before = self._noisy
        self.stepped.advance()
        logs = c.logs
        out = WindowStats(steps=len(logs), skipped=c.skipped, noisy_steps=self._noisy - noisy_before,
                          per_step=list(logs))
        for key in LOG_KEYS:
            vals = [row[key] for row in logs if key in row]
            if vals:
                setattr(out, key, float(np.mean(vals)))
        kls = [row["kl"] for row in logs if "kl" in row]
        out.kl_max = float(np.max(kls)) if kls else math.nan
        return out

    @torch.no_grad()
    def probe_gold(self, prompts: Sequence[str] | None = None, max_new_tokens: int | None = None) -> float:
        """Mean gold score of greedy completions of the probe prompts (or of ``prompts``)."""
        from stso_env.rlhf.prepare import greedy_completions

        prompts = self.probe_prompts if prompts is None else list(prompts)
        model = self.stepped.trainer.model
        budget = max_new_tokens or self.settings.probe_max_new_tokens
        completions = greedy_completions(model, self.tokenizer, prompts, max_new_tokens=budget)
        return float(np.mean([completion_score(p, c) for p, c in zip(prompts, completions)]))

    # ------------------------------------------------------------------ state

    def snapshot(self) -> dict[str, Any]:
        """In-memory state: the trainer's (bridge snapshot), the knobs and the noise counter."""
        return {"bridge": self.stepped.snapshot(), "knobs": asdict(self.knobs), "noisy": self._noisy}

    def restore(self, snap: dict[str, Any]) -> None:
        """Go back to a :meth:`snapshot` (of this run or of one built with the same arguments)."""
        left = self._args.max_steps - self.stepped.trainer.state.global_step  # the trainer's own count goes on
        if self.stepped.finished or left < self.settings.steps - snap["bridge"]["step"]:
            # the trainer's loop has ended, or would end before the run does: a fresh one takes the snapshot
            self.stepped.close()
            self.stepped = self._make_stepped()
        self.stepped.restore(snap["bridge"])
        for k, v in snap["knobs"].items():
            setattr(self.knobs, k, v)
        self._noisy = int(snap["noisy"])
        self.apply_knobs()

    def close(self) -> None:
        self.stepped.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
