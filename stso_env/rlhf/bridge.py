"""Step a TRL ``GRPOTrainer`` (or ``RLOOTrainer``) from outside: the loop stays TRL's, control comes back
every few steps.

A Gymnasium env must return after ``decision_interval`` optimizer steps, but ``trainer.train()``
owns its loop until the run ends. :class:`SteppedGRPO` runs ``train()`` in one worker thread; a
``TrainerCallback`` blocks it at ``on_step_end`` every ``interval`` steps and hands control to the
caller, who reads the trainer, changes its knobs (``trainer.beta``, the LR scale, ...) and calls
:meth:`SteppedGRPO.advance` for the next stretch. Only one of the two threads runs at a time, so
the run is as deterministic as a plain ``train()``.

The pause falls at ``on_step_begin`` of the step after the window, not at ``on_step_end`` of its
last step: the Trainer logs a step (``on_log``) and TRL syncs the reference model
(``SyncRefModelCallback.on_step_end``) after the step's ``on_step_end``, so only at the next step's
beginning is a window's work complete. :meth:`SteppedGRPO.start` pauses before the very first
step, which is where a fresh trainer can take a snapshot of another run (a fork).

Snapshots are in-memory copies taken while the worker is paused: model, optimizer, LR scheduler,
the torch / numpy / python RNGs (generation samples with torch's global RNG), and the trainer's
generation counters. :meth:`SteppedGRPO.restore` writes them back into the live trainer, and the
steps that follow repeat bit-exactly on CPU. Two details make that hold:

* Prompts come from a prompt stream with a cursor that the snapshot keeps, chosen when
  completions are generated (:meth:`_Streamed._generate_and_score_completions`),
  not when the dataloader fetches rows: accelerate's dataloader fetches one batch ahead, so a
  batch fetched before a snapshot would otherwise be replayed with the prompts of after it.
* The trainer's dataset is a placeholder that the bridge sizes to last the whole run: at an
  epoch boundary the Trainer builds a new dataloader iterator, which draws a seed from the torch
  RNG, and after a restore that boundary would fall at another step.
* ``trainer.state.global_step`` keeps counting after a restore (it is the trainer's own loop
  variable); the bridge reports steps since the start of the stream as :attr:`SteppedGRPO.step`.
"""

from __future__ import annotations

import copy
import queue
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOTrainer, RLOOTrainer

_STOP, _GO = "stop", "go"


class _Streamed:
    """A TRL online trainer whose prompts are group ``cursor, cursor + 1, ...`` of a stream instead of the
    sampler's rows (mixed into GRPOTrainer and RLOOTrainer, which share this generation step in TRL 1.16)."""

    prompt_of: Callable[[int], str]
    cursor: int = 0

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        g = self.num_generations
        rows = []
        for j in range(len(inputs) // g):  # the sampler repeats each row g times in a row: one group
            prompt = self.prompt_of(self.cursor + j)
            rows += [dict(inputs[j * g + r], prompt=prompt) for r in range(g)]
        self.cursor += len(inputs) // g
        return super()._generate_and_score_completions(rows)  # type: ignore[misc]


class _StreamedGRPOTrainer(_Streamed, GRPOTrainer):
    pass


class _StreamedRLOOTrainer(_Streamed, RLOOTrainer):
    pass


TRAINERS = {"grpo": _StreamedGRPOTrainer, "rloo": _StreamedRLOOTrainer}


class _Stopped(Exception):
    """Raised inside the worker to end the run at a pause (SteppedGRPO.close)."""


class _Pause(TrainerCallback):
    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.to_caller: queue.Queue = queue.Queue()
        self.to_worker: queue.Queue = queue.Queue()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.interval == 0:
            self.to_caller.put(("paused", state.global_step))
            if self.to_worker.get() == _STOP:
                raise _Stopped
        return control


class SteppedGRPO:
    """A ``GRPOTrainer`` (or ``RLOOTrainer``) advanced ``interval`` optimizer steps at a time, with exact
    snapshots.

    Args:
        prompt_of: prompt of group ``i`` of the stream (a pure function of ``i``, e.g. a seeded
            permutation of the train prompts).
        interval: optimizer steps per :meth:`advance`.
        algorithm: ``grpo`` (``GRPOTrainer``, ``args`` a ``GRPOConfig``) or ``rloo`` (``RLOOTrainer``,
            ``args`` an ``RLOOConfig``).
        trainer_kwargs: keyword arguments of the trainer (``model``, ``reward_funcs``,
            ``args``, ``processing_class``, ...) except ``train_dataset``, which the bridge makes
            (one epoch of placeholder rows; the prompts come from ``prompt_of``); ``args.max_steps``
            (> 0) bounds the run.
    """

    def __init__(self, prompt_of: Callable[[int], str], interval: int, algorithm: str = "grpo",
                 **trainer_kwargs: Any) -> None:
        if algorithm not in TRAINERS:
            raise ValueError(f"SteppedGRPO algorithm: {algorithm!r}; choose one of {', '.join(TRAINERS)}")
        if interval < 1:
            raise ValueError(f"SteppedGRPO interval: must be >= 1 optimizer step, got {interval}")
        if "train_dataset" in trainer_kwargs:
            raise ValueError("SteppedGRPO: pass prompts through prompt_of, not train_dataset (the bridge makes it)")
        args = trainer_kwargs.get("args")
        if args is None or getattr(args, "max_steps", 0) <= 0:
            raise ValueError("SteppedGRPO args: a GRPOConfig with max_steps > 0 (the run's length) is required")
        # rows the run consumes: each row is one group of num_generations completions
        rows = args.max_steps * args.per_device_train_batch_size * args.steps_per_generation // args.num_generations
        trainer_kwargs["train_dataset"] = Dataset.from_dict({"prompt": [""] * (rows + 1)})
        self._pause = _Pause(interval)
        callbacks = list(trainer_kwargs.pop("callbacks", None) or []) + [self._pause]
        self.trainer = TRAINERS[algorithm](callbacks=callbacks, **trainer_kwargs)
        self.trainer.prompt_of = prompt_of
        self.interval = interval
        self.step = 0
        self.finished = False
        self._offset = 0  # step - trainer.state.global_step (a restore moves the stream, not the trainer's counter)
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        try:
            self.trainer.train()
            self._pause.to_caller.put(("finished", self.trainer.state.global_step))
        except _Stopped:
            self._pause.to_caller.put(("finished", self.trainer.state.global_step))
        except BaseException as exc:  # handed to the caller's thread, which raises it
            self._pause.to_caller.put(("error", exc))

    def _wait(self) -> None:
        kind, payload = self._pause.to_caller.get()
        if kind == "error":
            self.finished = True
            raise RuntimeError(f"the GRPO trainer failed: {payload!r}") from payload
        self.finished = kind == "finished"
        self.step = int(payload) + self._offset

    def start(self) -> None:
        """Start the trainer and pause it before its first step (nothing is trained yet)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="grpo-trainer", daemon=True)
        self._thread.start()
        self._wait()

    def advance(self) -> int:
        """Run the next ``interval`` optimizer steps; returns :attr:`step`. After the last step
        (``args.max_steps``) :attr:`finished` is True."""
        self.start()
        if self.finished:
            raise RuntimeError("the run has finished (args.max_steps); build a new SteppedGRPO")
        self._pause.to_worker.put(_GO)
        self._wait()
        return self.step

    def snapshot(self) -> dict[str, Any]:
        """In-memory copy of everything the next steps depend on (take it between :meth:`advance` calls)."""
        t = self.trainer
        return {"model": copy.deepcopy(t.model.state_dict()),
                "ref_model": None if t.ref_model is None else copy.deepcopy(t.ref_model.state_dict()),
                "optimizer": copy.deepcopy(t.optimizer.state_dict()),
                "scheduler": copy.deepcopy(t.lr_scheduler.state_dict()),
                "beta": t.beta, "cursor": t.cursor, "_step": t._step,
                "buffered_inputs": copy.deepcopy(t._buffered_inputs), "step": self.step,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}

    def restore(self, snap: dict[str, Any]) -> None:
        """Write a :meth:`snapshot` back into the paused trainer; the following steps repeat exactly.

        The snapshot may come from another ``SteppedGRPO`` built with the same arguments (a fork):
        the steps then follow as they would have in the run it came from."""
        if self.finished or self._thread is None:
            raise RuntimeError("restore needs a paused run (after start() or advance(), before the run finishes)")
        t = self.trainer
        t.model.load_state_dict(snap["model"])
        if snap["ref_model"] is not None:
            t.ref_model.load_state_dict(snap["ref_model"])
        # torch's load_state_dict keeps the given moment tensors (same dtype and device), and the next
        # steps would update them in place: the snapshot would change under its owner
        t.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
        t.lr_scheduler.load_state_dict(snap["scheduler"])
        t.beta, t.cursor, t._step = snap["beta"], snap["cursor"], snap["_step"]
        t._buffered_inputs = copy.deepcopy(snap["buffered_inputs"])
        self.step = snap["step"]
        self._offset = self.step - self.trainer.state.global_step
        torch.set_rng_state(snap["rng"]["torch"])
        np.random.set_state(snap["rng"]["numpy"])
        random.setstate(snap["rng"]["python"])

    def close(self) -> None:
        """Stop the worker thread (it leaves the trainer's loop at the pause)."""
        if self._thread is not None and self._thread.is_alive() and not self.finished:
            self._pause.to_worker.put(_STOP)
            self._thread.join(timeout=60)
        self.finished = True


def stream_of(prompts: Sequence[str], seed: int) -> Callable[[int], str]:
    """Prompt ``i`` of a stream that walks seeded permutations of ``prompts``, one per epoch."""
    if not prompts:
        raise ValueError("stream_of prompts: need at least one prompt")
    items = list(prompts)

    def prompt_of(i: int) -> str:
        epoch, pos = divmod(int(i), len(items))
        order = np.random.default_rng([seed, epoch]).permutation(len(items))
        return items[int(order[pos])]

    return prompt_of
