"""The pre-training loop, one optimizer step at a time, with exact resumable state.

:class:`Trainer` owns a transformers ``GPT2LMHeadModel`` (next-token prediction) or, for the T5
presets, a ``T5ForConditionalGeneration`` trained on span corruption (:mod:`stso_env.train.span_corruption`,
applied to each window after the scenario's noise), an AdamW optimizer,
a warm-up + cosine ``LambdaLR`` schedule, a :class:`WindowSampler`, a
:class:`Scenario` (injected noise) and the *knobs* that interventions turn.
``train_step()`` runs one optimizer step and returns a :class:`StepStats`.

Determinism contract: the whole state (``state_dict()``) holds the model,
optimizer, scheduler, python/numpy/torch/cuda RNGs, the sampler (seed,
permutation, offset, epoch), the knobs, the clip-policy state and the global
step; ``load_state_dict`` in a fresh process and the same calls give the same
parameters and losses bit for bit on CPU. ``assets/state_schema_v1.yaml``
documents every field.

Knobs (see :class:`Knobs`): ``lr_scale`` and ``wd_scale`` multiply the
scheduled LR and the configured weight decay; ``clip_policy`` selects off /
ZClip / ARC / SPAM clipping (:mod:`stso_env.train.clipping`); the one-shot
requests ``momentum_reset`` (zero Adam's first moment), ``reorder`` (shuffle
the next block of windows) and ``skip_batch`` (draw the next batch, measure its
loss, do not update) apply to the next step only.

Data parallelism: when the process group is initialised (``torchrun``, see
:mod:`stso_env.train.distributed`) the trainer wraps its model in
``DistributedDataParallel``, each rank trains on its rows of the same global batch,
and the step's statistics are those of the global batch on every rank.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stso_env.config import TrainConfig, config_hash, to_dict
from stso_env.errors import CheckpointError, ConfigError
from stso_env.monitor.activations import activation_summary
from stso_env.train.clipping import CLIP_POLICIES, ZClip, arc_combine, spam_clip_
from stso_env.train.corpus import TokenSplits, check_length, load_corpus, validation_windows
from stso_env.train.distributed import check_batch, current_world, gather_objects, gather_rows
from stso_env.train.presets import build_model, context_length, count_parameters, flops_per_token, model_family
from stso_env.train.sampler import WindowSampler
from stso_env.train.scenario import load_scenario
from stso_env.train.span_corruption import SpanCorruption
from stso_env.train.tokenizer import build_tokenizer

STATE_SCHEMA_VERSION = 1


@dataclass
class Knobs:
    """What interventions turn. Persistent knobs stay until changed; one-shots apply to one step."""

    lr_scale: float = 1.0
    wd_scale: float = 1.0
    clip_policy: str = "off"
    momentum_reset: bool = False
    reorder: bool = False
    skip_batch: bool = False

    def validate(self) -> None:
        if self.clip_policy not in CLIP_POLICIES:
            raise ConfigError(f"knobs.clip_policy: {self.clip_policy!r} is not a clip policy; choose one of "
                              f"{', '.join(CLIP_POLICIES)}")
        for name in ("lr_scale", "wd_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"knobs.{name}: {v!r} must be a finite positive multiplier")


@dataclass
class StepStats:
    """What one optimizer step did. ``loss`` is the mean token loss of the batch as trained."""

    step: int
    loss: float
    clean_loss: float  # mean over sequences untouched by scenario noise (NaN if none)
    seq_loss_mean: float
    seq_loss_var: float
    grad_norm: float  # total norm before any clipping
    grad_norm_clipped: float  # total norm as applied
    clip_bound: float  # effective bound of this step (inf when nothing bounded it)
    clipped: bool
    lr: float
    weight_decay: float
    clip_policy: str
    tokens: int
    flops: float
    skipped: bool
    momentum_reset: bool
    reordered: bool
    nonfinite: bool
    noise: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class WarmupCosine:
    """LR factor: linear warm-up to 1, cosine down to ``min_ratio``.

    ``LambdaLR.state_dict`` stores this object's ``__dict__`` (plain numbers), so
    the schedule itself is saved with the state.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = int(warmup), int(total), float(min_ratio)
        # a re-planned tail (see replan): from step tail_start, cosine from tail_from down to min_ratio
        # at tail_end; None: the planned schedule throughout
        self.tail_start: int | None = None
        self.tail_from = 1.0
        self.tail_end: int | None = None

    def planned(self, step: int) -> float:
        """The factor of the schedule as first planned (no re-planned tail)."""
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def __call__(self, step: int) -> float:
        if self.tail_start is None or self.tail_end is None or step < self.tail_start:
            return self.planned(step)
        t = min(1.0, (step - self.tail_start) / max(1, self.tail_end - self.tail_start))
        return self.min_ratio + (self.tail_from - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def replan(self, step: int, end: int) -> None:
        """End the schedule at ``end`` instead: from ``step`` on, a cosine from the factor at ``step``
        down to ``min_ratio`` at ``end``. The LR stays continuous, and a run whose budget shrank
        (training spent outside it) still anneals fully before the budget runs out."""
        step, end = int(step), int(end)
        if end <= step:
            raise ValueError(f"replan: end {end} must come after step {step}")
        self.tail_from = float(self(step))
        self.tail_start, self.tail_end = step, end

    @property
    def end(self) -> int:
        """The step at which the factor reaches ``min_ratio``."""
        return self.total if self.tail_end is None else self.tail_end


_SPLITS_CACHE: dict[tuple, TokenSplits] = {}


def load_splits(cfg: TrainConfig) -> TokenSplits:
    """Token splits for ``cfg.data``, memoised per process: envs reset and fork often, and the
    arrays are never written to, so every trainer of a process can share them."""
    d = cfg.data
    key = (d.corpus, d.tokenizer, d.corpus_seed, d.builtin_chars, d.valid_fraction)
    if key not in _SPLITS_CACHE:
        if len(_SPLITS_CACHE) >= 4:
            _SPLITS_CACHE.pop(next(iter(_SPLITS_CACHE)))
        _SPLITS_CACHE[key] = load_corpus(d.corpus, build_tokenizer(d.tokenizer), seed=d.corpus_seed,
                                         builtin_chars=d.builtin_chars, valid_fraction=d.valid_fraction)
    return _SPLITS_CACHE[key]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(name)


def capture_rng() -> dict[str, Any]:
    """Global RNG states: python, numpy, torch CPU and every CUDA device."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    np.random.set_state(_as_tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_as_tuple(v) for v in x)
    return x


class Trainer:
    """One GPT-2 pre-training run.

    Args:
        cfg: the run's :class:`~stso_env.config.TrainConfig`.
        splits: pre-loaded token splits (forks share them); loaded from ``cfg.data`` when None.
        compile_model: run the training passes through ``torch.compile`` (the probe, evaluation and
            state use the plain module). A speed option, outside the config and its hash: compiled
            kernels may round differently, so a compiled run is not bit-identical to an eager one.
    """

    def __init__(self, cfg: TrainConfig, *, splits: TokenSplits | None = None, compile_model: bool = False) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        self.splits = splits if splits is not None else load_splits(cfg)
        self.seq_len = cfg.data.seq_len or context_length(cfg.model.preset)
        check_length(self.splits, self.seq_len)
        #: T5 presets: the span-corruption objective (None: GPT-2's next-token prediction)
        self.span_corruption: SpanCorruption | None = None
        if model_family(cfg.model.preset) == "t5":
            self.span_corruption = SpanCorruption(self.tokenizer.vocab_size)
            self.span_corruption.check_length(self.seq_len)
        self.scenario = load_scenario(cfg.scenario)
        # Scenario noise has its own seed stream, so two runs that differ only in their
        # scenario see the same data order and the same init.
        self.noise_seed = int(np.random.default_rng([cfg.seed, 7]).integers(2**31))

        # Seed everything, then build: model init draws from the torch RNG.
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        sc = self.span_corruption
        self.model = build_model(
            cfg.model.preset, sc.model_vocab_size if sc else self.tokenizer.vocab_size,
            pretrained=cfg.model.pretrained, dropout=cfg.model.dropout,
            attn_implementation=cfg.model.attn_implementation,
            n_positions=max(self.seq_len, context_length(cfg.model.preset)), qk_norm=cfg.model.qk_norm,
        ).to(self.device)
        self.model.train()
        if cfg.model.gradient_checkpointing:
            # transformers recomputes each block in the backward pass (training mode only, so probes and
            # evaluation are unaffected); non-reentrant checkpointing restores the RNG for dropout, so
            # the same numbers come out.
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # Data parallelism (stso_env.train.distributed): the caller joins the process group first
        # (python -m stso_env.train does under torchrun); self.model stays the plain module for
        # probes, evaluation and state, and self.ddp runs the training passes.
        self.world = current_world()
        self.local_batch = check_batch(cfg.data.batch_size, self.world)
        self.ddp: torch.nn.Module = self.model
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index or 0] if self.device.type == "cuda" else None
            # buffers (GPT-2's causal masks) are the same on every rank: no need to sync them each forward
            self.ddp = DistributedDataParallel(self.model, device_ids=ids, forward_sync_buffers=False)
        if compile_model:
            self.ddp = torch.compile(self.ddp)
        self.n_params = count_parameters(self.model)
        self.flops_per_token = flops_per_token(self.model, self.seq_len)

        decay, no_decay = [], []
        for _name, p in self.model.named_parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
        self.params = decay + no_decay
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            # betas/eps: the train config's, with the scenario's overrides (optimizer-dynamics scenarios)
            lr=o.lr, **self.scenario.adamw_kwargs(o), foreach=True,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(o.warmup_steps, o.decay_steps or cfg.steps, o.min_lr_ratio))
        self.sampler = WindowSampler(self.splits.train, self.seq_len, cfg.data.batch_size, cfg.seed)
        self.knobs = Knobs()
        self.zclip = ZClip(cfg.clip.zclip_alpha, cfg.clip.zclip_z_thresh, cfg.clip.zclip_warmup)
        self.global_step = 0
        self.ema = {"loss": None, "grad_norm": None}
        self._probe: torch.Tensor | None = None
        self._probe_pair: tuple[torch.Tensor, torch.Tensor] | None = None
        self.config_hash = config_hash(cfg)
        #: Called before the trainer changes any tensor or array of its state in place (an
        #: optimizer step, a momentum reset, a reorder, a load): an overlapped checkpoint
        #: snapshot (``CheckpointStore.save(..., overlap=True)``) registers its barrier here.
        self.mutation_barriers: list[Callable[[], Any]] = []
        #: Per-step hooks of controllers that act inside a window (SPAM's resets and LR warm-up,
        #: hypergradient descent, skip-step, StableAdamW). ``pre_step_hooks`` run at the start of
        #: ``train_step`` and may turn knobs; ``pre_update_hooks`` run after the backward pass and
        #: clipping, with the gradients in ``p.grad`` and ``step_loss`` / ``step_grad_norm`` /
        #: ``step_grad_norm_applied`` set, before the LR is set and the optimizer steps; they may
        #: set ``veto_update``. ``post_update_hooks`` run right after ``optimizer.step()`` (only
        #: when it ran), with ``p.grad`` and the updated optimizer state still in place, and may
        #: rewrite the parameters (StableAdamW's update clipping). None of them runs on a skipped
        #: batch or a non-finite step. Hooks are not part of the saved state: their owners keep
        #: their own.
        self.pre_step_hooks: list[Callable[[Trainer], Any]] = []
        self.pre_update_hooks: list[Callable[[Trainer], Any]] = []
        self.post_update_hooks: list[Callable[[Trainer], Any]] = []
        #: One-shot veto of the next optimizer update (OLMo-core's skip-step rule): a hook sets it;
        #: the step still draws its batch, measures loss and gradient (reported in its StepStats,
        #: with ``skipped=True`` and the full FLOPs) and advances the LR schedule, but the optimizer
        #: does not step (parameters, Adam moments and Adam's step count untouched). Cleared at the
        #: end of every step.
        self.veto_update = False
        #: The step being run, for hooks: mean batch loss (as StepStats reports it), total grad
        #: norm before any clipping and as applied. Set after the backward pass of each step.
        self.step_loss = math.nan
        self.step_grad_norm = math.nan
        self.step_grad_norm_applied = math.nan
        #: Replaces the static global-norm cap ``optim.max_grad_norm`` under every clip policy when
        #: not None (0 = no cap). For controllers whose method has no global-norm clipping (SPAM,
        #: StableAdamW, as in their reference runs); like the hooks, not saved state: the owner sets
        #: it again on a rebuilt trainer.
        self.max_grad_norm_override: float | None = None

    def _barrier(self) -> None:
        for fn in self.mutation_barriers:
            fn()

    # ------------------------------------------------------------------ interventions

    def set_knobs(self, **changes: Any) -> None:
        """Change knobs by name (``lr_scale``, ``wd_scale``, ``clip_policy``, ``momentum_reset``, ...)."""
        for k, v in changes.items():
            if not hasattr(self.knobs, k):
                raise ConfigError(f"knobs.{k}: unknown knob; allowed: {', '.join(asdict(self.knobs))}")
            setattr(self.knobs, k, v)
        self.knobs.validate()

    @property
    def step_flops(self) -> float:
        """Nominal FLOPs of one optimizer step on the global batch (what budgets are counted in)."""
        return self.flops_per_token * self.seq_len * self.cfg.data.batch_size

    @property
    def schedule_end(self) -> int:
        """The step at which the LR schedule reaches its floor (``decay_steps`` or ``steps`` unless re-planned)."""
        return self.scheduler.lr_lambdas[0].end

    def replan_schedule(self, end: int) -> None:
        """Make the LR schedule reach its floor at step ``end`` (a cosine from the current LR factor,
        so the LR stays continuous). For a run whose budget shrinks while it trains, e.g. when a
        controller pays for forked training from it: without this the run stops wherever the budget
        runs out, with its LR still high. ``end`` must lie after the current step."""
        end = int(end)
        if end <= self.global_step:
            raise ConfigError(f"replan_schedule: end {end} must be after the current step {self.global_step}")
        for fn in self.scheduler.lr_lambdas:
            fn.replan(self.global_step, end)

    # ------------------------------------------------------------------ data

    @property
    def probe_batch(self) -> torch.Tensor:
        """A fixed batch of evenly spaced windows of the *probe* split: the env's reward probe, what
        controllers may look at. It never overlaps the validation or test split."""
        if self._probe is None:
            w = validation_windows(self.splits.probe, self.seq_len,
                                   self.cfg.probe_batches * self.cfg.data.batch_size)
            self._probe = torch.from_numpy(w.astype(np.int64)).to(self.device)
        return self._probe

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    # Evaluation and probe windows are span-corrupted with fixed keys (the row: the window's index), so
    # every run and every step of a T5 is scored on the same task.
    _EVAL_KEYS = {"validation": (0x5EED, 1), "test": (0x5EED, 2), "probe": (0x5EED, 3)}

    def _pair(self, windows: torch.Tensor, key: tuple[int, ...], rows: np.ndarray | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of ``(B, seq_len + 1)`` windows: the shifted pair for GPT-2, the span-corrupted
        (encoder input, decoder target) of the last ``seq_len`` tokens for T5."""
        if self.span_corruption is None:
            return windows[:, :-1], windows[:, 1:]
        return self.span_corruption.corrupt(windows[:, 1:], key, rows)

    def _seq_losses(self, inputs: torch.Tensor, labels: torch.Tensor, module: torch.nn.Module | None = None
                    ) -> torch.Tensor:
        extra = {}
        if self.span_corruption is not None:
            extra["decoder_input_ids"] = self.span_corruption.decoder_inputs(labels)
        with self._autocast():
            logits = (self.model if module is None else module)(input_ids=inputs, use_cache=False, **extra).logits
        tok = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        return tok.view(labels.shape).mean(1)

    # ------------------------------------------------------------------ the step

    def train_step(self) -> StepStats:
        """Run one optimizer step (or a skipped one) and return what happened."""
        t0 = time.perf_counter()
        cfg, k = self.cfg, self.knobs
        step = self.global_step
        for hook in self.pre_step_hooks:
            hook(self)

        # One-shot interventions act before the batch is drawn.
        if k.momentum_reset or k.reorder:
            self._barrier()
        did_reset = bool(k.momentum_reset)
        if did_reset:
            for state in self.optimizer.state.values():
                if "exp_avg" in state:
                    state["exp_avg"].zero_()
        did_reorder = bool(k.reorder)
        if did_reorder:
            self.sampler.reorder(cfg.data.reorder_block)
        skip = bool(k.skip_batch)
        k.momentum_reset = k.reorder = k.skip_batch = False

        window = self.sampler.next_batch()
        inputs, labels = window[:, :-1], window[:, 1:]
        inputs, labels, loss_mult, lr_mult, noise = self.scenario.apply(
            self.noise_seed, step, inputs, labels, self.tokenizer.vocab_size)
        corrupted = self._corrupted_rows(inputs, labels, window)
        tokens = inputs.numel()  # of the global batch
        if self.span_corruption is not None:
            # the window as the scenario left it (its labels: the window after the first token) is the
            # text that span corruption masks; keyed by seed and step, as the scenario's noise
            inputs, labels = self.span_corruption.corrupt(labels, (cfg.seed, 11, step))
        if self.world.distributed:  # this rank's rows of the global batch
            rows = slice(self.world.rank * self.local_batch, (self.world.rank + 1) * self.local_batch)
            inputs, labels = inputs[rows], labels[rows]
        inputs, labels = inputs.to(self.device), labels.to(self.device)

        sched_lr = self.scheduler.get_last_lr()
        lr = sched_lr[0] * k.lr_scale * lr_mult
        wd = cfg.optim.weight_decay * k.wd_scale

        if skip:
            self.veto_update = False  # one-shot: a skipped batch has no update to veto
            with torch.no_grad():
                seq_losses = gather_rows(self._seq_losses(inputs, labels), self.world)
            stats = self._finish(step, seq_losses, corrupted, math.nan, math.nan, math.inf, False, lr, wd,
                                 tokens, 2.0 * self.flops_per_token / 6.0 * tokens, True, did_reset,
                                 did_reorder, False, noise, t0)
            self.scheduler.step()
            return stats

        seq_losses, grad_norm, applied_norm, bound = self._backward(inputs, labels, loss_mult)
        nonfinite = not (math.isfinite(grad_norm) and torch.isfinite(seq_losses).all())
        # What this step measured, for the update hooks (the loss exactly as StepStats reports it).
        self.step_loss = float(seq_losses.detach().float().cpu().mean())
        self.step_grad_norm, self.step_grad_norm_applied = grad_norm, applied_norm
        if not nonfinite and self.pre_update_hooks:
            for hook in self.pre_update_hooks:
                hook(self)
            lr = sched_lr[0] * k.lr_scale * lr_mult
        # A vetoed step (skip-step) keeps its measurements but not its update; a non-finite one
        # is never applied anyway and is reported as non-finite, not as skipped.
        vetoed = bool(self.veto_update) and not nonfinite
        self.veto_update = False
        if not nonfinite and not vetoed:
            for group, base_lr in zip(self.optimizer.param_groups, sched_lr):
                group["lr"] = base_lr * k.lr_scale * lr_mult
            self.optimizer.param_groups[0]["weight_decay"] = wd
            self._barrier()
            self.optimizer.step()
            for hook in self.post_update_hooks:
                hook(self)
        self.optimizer.zero_grad(set_to_none=True)
        # The LR schedule follows the step count, skipped updates included (as OLMo-core's does).
        self.scheduler.step()
        return self._finish(step, seq_losses, corrupted, grad_norm, applied_norm, bound,
                            applied_norm < grad_norm * (1 - 1e-6), lr, wd, tokens,
                            self.flops_per_token * tokens, vetoed, did_reset, did_reorder, nonfinite, noise, t0)

    def _corrupted_rows(self, inputs: torch.Tensor, labels: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        return ((inputs != window[:, :-1]) | (labels != window[:, 1:])).any(1)

    def _backward(self, inputs: torch.Tensor, labels: torch.Tensor,
                  loss_mult: float) -> tuple[torch.Tensor, float, float, float]:
        """Forward/backward over shards, then clipping. Returns (seq losses, raw norm, applied norm, bound)."""
        cfg, policy = self.cfg, self.knobs.clip_policy
        n = cfg.optim.micro_batches
        if policy == "arc":
            n = max(n, cfg.clip.arc_shards)
        n = min(n, inputs.shape[0])
        shards = torch.arange(inputs.shape[0]).tensor_split(n)
        seq_losses = torch.empty(inputs.shape[0], device=self.device)
        rows = []
        self.optimizer.zero_grad(set_to_none=True)
        for idx in shards:
            sl = self._seq_losses(inputs[idx], labels[idx], self.ddp)
            seq_losses[idx] = sl.detach()
            # Weight each shard by its share of the batch so accumulated grads equal the full-batch mean.
            (sl.mean() * (len(idx) / inputs.shape[0]) * loss_mult).backward()
            if policy == "arc":
                # ARC compares per-shard mean gradients: undo the batch-share weighting.
                rows.append(torch.cat([p.grad.reshape(-1) for p in self.params]) * (inputs.shape[0] / len(idx)))
                self.optimizer.zero_grad(set_to_none=True)
        bound = math.inf
        if policy == "arc":
            stacked = torch.stack(rows)
            grad_norm = float(torch.linalg.vector_norm(stacked.mean(0)))
            flat, bound, _ = arc_combine(stacked, cfg.clip.arc_f)
            offset = 0
            for p in self.params:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]))
        if policy == "spam":
            spam_clip_(self.params, self.optimizer, cfg.clip.spam_theta)
        seq_losses = gather_rows(seq_losses, self.world)  # the global batch's, on every rank
        grads = [p.grad for p in self.params if p.grad is not None]
        norm_now = float(torch.nn.utils.get_total_norm(grads))
        if policy == "zclip":
            thr = self.zclip.threshold(grad_norm)
            if thr is not None:
                bound = min(bound, thr)
        # The static cap: the config's unless a controller overrides it; ZClip and SPAM's clipping
        # replace it (their papers compare them against fixed-threshold norm clipping).
        from stso_env.train.clipping import REPLACES_STATIC_CAP

        cap = self.max_grad_norm_override
        if cap is None:
            cap = 0.0 if policy in REPLACES_STATIC_CAP else cfg.optim.max_grad_norm
        if cap > 0:
            bound = min(bound, cap)
        if math.isfinite(bound) and math.isfinite(norm_now) and norm_now > bound:
            torch.nn.utils.clip_grads_with_norm_(self.params, bound, torch.tensor(norm_now))
            norm_now = float(torch.nn.utils.get_total_norm(grads))
        return seq_losses, grad_norm, norm_now, bound

    def _finish(self, step, seq_losses, corrupted, grad_norm, applied, bound, clipped, lr, wd, tokens, flops,
                skipped, reset, reordered, nonfinite, noise, t0) -> StepStats:
        sl = seq_losses.detach().float().cpu()
        clean = sl[~corrupted.cpu()]
        loss = float(sl.mean())
        for key, val in (("loss", loss), ("grad_norm", grad_norm)):
            if math.isfinite(val):
                prev = self.ema[key]
                self.ema[key] = val if prev is None else 0.98 * prev + 0.02 * val
        self.global_step += 1
        return StepStats(
            step=step, loss=loss, clean_loss=float(clean.mean()) if len(clean) else math.nan,
            seq_loss_mean=loss, seq_loss_var=float(sl.var(unbiased=False)), grad_norm=grad_norm,
            grad_norm_clipped=applied, clip_bound=bound, clipped=bool(clipped), lr=lr, weight_decay=wd,
            clip_policy=self.knobs.clip_policy, tokens=tokens, flops=float(flops), skipped=skipped,
            momentum_reset=reset, reordered=reordered, nonfinite=nonfinite, noise=noise,
            seconds=time.perf_counter() - t0,
        )

    def train_steps(self, n: int, callback: Callable[[StepStats], None] | None = None) -> list[StepStats]:
        """Run ``n`` steps; ``callback`` sees each step's stats."""
        out = []
        for _ in range(n):
            s = self.train_step()
            out.append(s)
            if callback is not None:
                callback(s)
        return out

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, max_windows: int | None = 64, split: str = "validation") -> dict[str, float]:
        """Loss and perplexity over up to ``max_windows`` evenly spaced windows of a held-out split
        (``None``: all of it). ``split`` is ``"validation"`` (selection, calibration) or ``"test"`` (the
        final score only; nothing during a run may read it). The probe has :meth:`probe_loss`."""
        arrays = {"validation": self.splits.valid, "test": self.splits.test}
        if split not in arrays:
            raise ConfigError(f"evaluate(split={split!r}): choose 'validation' or 'test' (the probe split is "
                              "read through probe_loss()/probe())")
        w = torch.from_numpy(validation_windows(arrays[split], self.seq_len, max_windows).astype(np.int64))
        was = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            for first, chunk in zip(range(0, len(w), self.cfg.data.batch_size), w.split(self.cfg.data.batch_size)):
                chunk = chunk.to(self.device)
                sl = self._seq_losses(*self._pair(chunk, self._EVAL_KEYS[split],
                                                  np.arange(first, first + len(chunk))))
                total += float(sl.sum()) * self.seq_len
                count += sl.numel() * self.seq_len
        finally:
            self.model.train(was)
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 80.0)), "val_tokens": count, "split": split}

    @torch.no_grad()
    def probe_loss(self) -> float:
        """Mean loss on the fixed probe batch (eval mode, no RNG drawn)."""
        was = self.model.training
        self.model.eval()
        try:
            return float(self._seq_losses(*self.probe_pair).mean())
        finally:
            self.model.train(was)

    @property
    def probe_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe batch as (inputs, labels) of the model's objective."""
        if self._probe_pair is None:
            self._probe_pair = self._pair(self.probe_batch, self._EVAL_KEYS["probe"])
        return self._probe_pair

    def _summary_kwargs(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        sc = self.span_corruption
        return {} if sc is None else {"decoder_input_ids": sc.decoder_inputs(labels)}

    def probe(self) -> tuple[float, list[dict[str, float]]]:
        """Probe loss and per-layer activation/attention summaries from one eval-mode pass."""
        inputs, labels = self.probe_pair
        with self._autocast():
            rows, seq_losses = activation_summary(self.model, inputs, labels, **self._summary_kwargs(labels))
        return float(seq_losses.mean()), rows

    def activation_summary(self, n_sequences: int = 4) -> list[dict[str, float]]:
        """Per-layer activation/attention summaries on the first probe sequences."""
        inputs, labels = (t[:n_sequences] for t in self.probe_pair)
        return activation_summary(self.model, inputs, **self._summary_kwargs(labels))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The complete training state (see ``assets/state_schema_v1.yaml``). Tensors are live references."""
        return {
            "schema_version": STATE_SCHEMA_VERSION,
            "global_step": self.global_step,
            "epoch": self.sampler.epoch,
            "config": to_dict(self.cfg),
            "config_hash": self.config_hash,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng(),
            "ranks": self._ranks_state(),
            "sampler": self.sampler.state_dict(),
            "knobs": asdict(self.knobs),
            "clip": {"zclip": self.zclip.state_dict()},
            "ema": dict(self.ema),
        }

    def _ranks_state(self) -> dict[str, Any]:
        """The world size and, in a distributed run, every rank's RNG state (a collective: every rank
        calls :meth:`state_dict` together)."""
        rng = gather_objects(capture_rng(), self.world) if self.world.distributed else []
        return {"world_size": self.world.size, "rng": rng}

    def load_state_dict(self, state: dict[str, Any], *, strict_config: bool = True) -> None:
        """Restore a state from :meth:`state_dict` (or a checkpoint loaded by :func:`stso_env.cp.load`)."""
        self._barrier()
        version = state.get("schema_version")
        if version != STATE_SCHEMA_VERSION:
            raise CheckpointError(f"state schema_version {version!r} is not supported (expected "
                                  f"{STATE_SCHEMA_VERSION})")
        if strict_config and state.get("config_hash") != self.config_hash:
            theirs = state.get("config") or {}
            diffs = _dict_diff(theirs, to_dict(self.cfg))
            raise CheckpointError(
                "the checkpoint was written by a different configuration "
                f"(differences: {'; '.join(diffs[:6]) or 'unknown'}); resume with the same config"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.knobs = Knobs(**state["knobs"])
        self.knobs.validate()
        self.zclip.load_state_dict(state["clip"]["zclip"])
        self.ema = dict(state["ema"])
        self.global_step = int(state["global_step"])
        ranks = state.get("ranks") or {"world_size": 1, "rng": []}
        if int(ranks["world_size"]) != self.world.size:
            raise CheckpointError(f"the checkpoint was written by {ranks['world_size']} process(es), this run has "
                                  f"{self.world.size}; resume at the same world size (torchrun --nproc-per-node)")
        restore_rng(ranks["rng"][self.world.rank] if self.world.distributed else state["rng"])


def _dict_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _dict_diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} vs {b!r}"]
