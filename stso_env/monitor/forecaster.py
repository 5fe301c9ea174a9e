"""Online loss forecasters whose disagreement measures how unfamiliar the current loss curve is.

An ensemble of K tiny recurrent nets (GRU or LSTM) reads the last W training losses and
predicts the **mean loss of the next N steps** (the mean rather than the single loss at +N:
per-step losses are noisy, the mean is what a controller can act on). The nets are trained
online from a replay buffer while the run goes on; where the buffer holds many windows like
the current one they agree, where the regime is new (a spike, a plateau, a changed slope)
their extrapolations differ. The variance of their forecasts is the *predictive
disagreement* used by :mod:`stso_env.monitor.uncertainty` (deep-ensemble style uncertainty,
Lakshminarayanan et al. 2017; online bagging, Oza & Russell 2001).

Normalisation. A window ``l_1..l_W`` with mean ``m`` and standard deviation ``s`` is fed in
window units ``u_i = (l_i - m) / s`` and the target is ``y = (mean(l_{W+1}..l_{W+N}) - m) / s``
(clipped to ``+-CLIP``; the inputs need no clip, ``|u_i| <= sqrt(W - 1)`` always). ``s`` is
floored at ``1e-3 |m| + 1e-8`` so a flat window does not turn rounding noise into signal. Window
units make the nets' job scale-free: a falling window at loss 9 and one at loss 3 with the
same shape are the same input, so what is learned early transfers as the loss falls, and every
input is of order one whatever the noise level. Forecasts are mapped back with ``m + s y_hat``;
the disagreement is the population variance of the K values ``y_hat`` (window-std units
squared), so it does not shrink just because the loss does.

Packing. The K nets are independent (own init seed, own bootstrap, own minibatches) but are
stored as one block-diagonal recurrent layer of width ``K * hidden`` so one call of the
recurrent kernel runs all of them: the off-diagonal blocks start at zero and their gradients
are masked to zero, so Adam (element-wise) leaves them exactly zero and the packed layer
computes exactly K separate nets with K separate Adam states. A tiny net's cost is dominated
by per-operation overhead, not by arithmetic, so each recurrent step reads ``patch``
consecutive losses (W / patch recurrent steps): with W = 32 and patch = 8 one training update
costs about 1.3 ms and one forecast about 0.15 ms on the 2-core development CPU; patch = 1
costs about 4x that.

Bootstrap. Each (window, target) pair gets a Poisson(1) weight per net when it enters the
buffer (online bagging); net k's training loss weights its samples by its own counts, and each
net draws its own minibatch indices. All randomness comes from a private ``numpy`` Generator
and per-net ``torch.Generator`` objects: the global RNG streams, on which the trainer's
bit-exact resume depends, are never touched.
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

#: Normalised inputs and targets are clipped to +-CLIP window standard deviations.
CLIP = 10.0
#: The window std is floored at REL_STD_FLOOR * |window mean| + STD_EPS, so a flat window
#: (rounding noise only) does not blow tiny differences up to many units.
REL_STD_FLOOR = 1e-3
STD_EPS = 1e-8
#: Gates per recurrent unit, by cell type.
GATES = {"gru": 3, "lstm": 4}


def _seed_for(seed: int, k: int) -> int:
    """Independent seed for net ``k`` (SeedSequence spreads nearby seeds apart)."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed torch ops on one intra-op thread, then restore the caller's setting.

    The nets are far too small to gain from threads, and on a busy 2-core machine OpenMP's
    fork/join around each tiny kernel made 120 training updates take 14 s instead of 0.12 s.
    One thread also makes the forecasts independent of the trainer's thread count. Switching
    costs well under a microsecond.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _clone(obj: Any) -> Any:
    """Deep copy of a state tree, so a saved state is not changed by later training in place."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v) for v in obj)
    return obj


class PackedRecurrent(nn.Module):
    """K independent one-layer GRU/LSTM regressors packed block-diagonally into one layer.

    Input ``(batch, steps, K * patch)``: columns ``k*patch:(k+1)*patch`` are net k's input.
    Output ``(batch, K)``: net k's prediction, a linear read-out of its last hidden state.

    All weights live in one flat parameter (``w_ih``, ``w_hh``, ``b_ih``, ``b_hh`` in PyTorch's
    GRU/LSTM layout, then the read-out) so a training update is one Adam step on one tensor and
    one mask multiply, instead of per-tensor bookkeeping that would dominate at this size.
    """

    def __init__(self, n_models: int, patch: int, hidden: int, kind: str, seed: int) -> None:
        super().__init__()
        if kind not in GATES:
            raise ValueError(f"forecaster kind {kind!r} is not one of {', '.join(GATES)}")
        self.n_models, self.patch, self.hidden, self.kind = n_models, patch, hidden, kind
        width = n_models * hidden
        rows = GATES[kind] * width
        self.shapes = ((rows, n_models * patch), (rows, width), (rows,), (rows,), (n_models, hidden), (n_models,))
        self.sizes = tuple(math.prod(s) for s in self.shapes)
        self.flat = nn.Parameter(torch.zeros(sum(self.sizes)))
        owner = (torch.arange(rows) % width) // hidden  # net owning each gate row
        mask_ih = owner[:, None] == torch.arange(n_models * patch)[None] // patch
        mask_hh = owner[:, None] == torch.arange(width)[None] // hidden
        mask = torch.ones(sum(self.sizes))
        mask[: self.sizes[0]] = mask_ih.flatten().float()
        mask[self.sizes[0]: self.sizes[0] + self.sizes[1]] = mask_hh.flatten().float()
        self.register_buffer("mask", mask, persistent=False)
        self._init(seed, owner)
        # Detached views share the flat parameter's storage, so they follow Adam's in-place
        # updates and load_state_dict's copies; inference reuses them instead of re-splitting.
        self._frozen_views = [t.view(s) for t, s in zip(self.flat.detach().split(self.sizes), self.shapes)]

    def views(self) -> list[torch.Tensor]:
        """``[w_ih, w_hh, b_ih, b_hh, head_w, head_b]`` as views of the flat parameter."""
        return [t.view(s) for t, s in zip(self.flat.split(self.sizes), self.shapes)]

    def _init(self, seed: int, owner: torch.Tensor) -> None:
        """PyTorch's default U(-1/sqrt(hidden), 1/sqrt(hidden)) for every weight, each net from its own seed."""
        bound = 1.0 / math.sqrt(self.hidden)
        w_ih, w_hh, b_ih, b_hh, head_w, head_b = self.views()
        with torch.no_grad():
            for k in range(self.n_models):
                gen = torch.Generator().manual_seed(_seed_for(seed, k))

                def draw(*shape: int, g: torch.Generator = gen) -> torch.Tensor:
                    return (torch.rand(shape, generator=g, dtype=torch.float32) * 2 - 1) * bound

                rows = owner == k
                n_rows = int(rows.sum())
                w_ih[rows, k * self.patch:(k + 1) * self.patch] = draw(n_rows, self.patch)
                w_hh[rows, k * self.hidden:(k + 1) * self.hidden] = draw(n_rows, self.hidden)
                b_ih[rows] = draw(n_rows)
                b_hh[rows] = draw(n_rows)
                head_w[k] = draw(self.hidden)
                head_b[k] = draw(1)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_ih, w_hh, b_ih, b_hh, head_w, head_b = self.views() if torch.is_grad_enabled() else self._frozen_views
        h0 = x.new_zeros(1, x.shape[0], self.n_models * self.hidden)
        # torch.gru / torch.lstm are the kernels behind nn.GRU / nn.LSTM, called with views of the
        # flat parameter (dropout 0, one layer, unidirectional, batch_first).
        if self.kind == "gru":
            _, h = torch.gru(x, h0, [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, False, False, True)
        else:
            _, h, _ = torch.lstm(x, (h0, h0), [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, False, False, True)
        return (h[0].view(x.shape[0], self.n_models, self.hidden) * head_w).sum(-1) + head_b

    def mask_grads(self) -> None:
        """Zero the gradients of the off-diagonal blocks so the K nets stay independent."""
        self.flat.grad.mul_(self.mask)


@dataclass
class Forecast:
    """The ensemble's view of the current window."""

    mean: float
    """Mean forecast of the mean loss over the next ``horizon`` steps, in loss units."""
    disagreement: float
    """Population variance of the K forecasts, in window-std units squared."""
    per_model: list[float]
    """Each net's forecast, in loss units."""


class ForecasterEnsemble:
    """K online-trained loss forecasters with a bootstrap replay buffer.

    Call :meth:`observe` once per step with a finite loss, then :meth:`predict`.
    Time is counted in observed (finite) losses: a step whose loss was not finite is simply
    not observed, so a NaN never enters a window or a target.
    """

    def __init__(self, *, n_models: int = 4, window: int = 32, horizon: int = 10, hidden: int = 16,
                 kind: str = "gru", lr: float = 1e-2, replay: int = 256, batch: int = 32,
                 train_every: int = 4, patch: int = 8, seed: int = 0) -> None:
        if window % patch:
            raise ValueError(f"window {window} is not a multiple of patch {patch}")
        if n_models < 1 or window < 1 or horizon < 1 or replay < 1 or batch < 1 or train_every < 1:
            raise ValueError("n_models, window, horizon, replay, batch and train_every must be >= 1")
        self.n_models, self.window, self.horizon, self.patch = n_models, window, horizon, patch
        self.batch, self.train_every, self.replay = batch, train_every, replay
        self.net = PackedRecurrent(n_models, patch, hidden, kind, seed)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x5750])))
        self.history: collections.deque[float] = collections.deque(maxlen=window + horizon)
        self.observed = 0
        self.train_steps = 0
        self.buf_x = np.zeros((replay, window), dtype=np.float32)
        self.buf_y = np.zeros(replay, dtype=np.float32)
        self.buf_w = np.zeros((replay, n_models), dtype=np.float32)
        self.size = 0
        self.pos = 0

    # ------------------------------------------------------------------ data

    @staticmethod
    def normalise(window: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Window units ``(l - m) / s`` with the window's mean ``m`` and floored std ``s``."""
        m = float(window.sum()) / window.shape[0]
        d = window - m
        s = math.sqrt(float(d @ d) / window.shape[0]) + REL_STD_FLOOR * abs(m) + STD_EPS
        return d / s, m, s

    def _push(self, x: np.ndarray, y: float) -> None:
        self.buf_x[self.pos] = x
        self.buf_y[self.pos] = y
        self.buf_w[self.pos] = self.rng.poisson(1.0, self.n_models)
        self.pos = (self.pos + 1) % self.replay
        self.size = min(self.size + 1, self.replay)

    def observe(self, loss: float) -> None:
        """Add one finite loss; store the pair whose target it completes; train when due."""
        if not math.isfinite(loss):
            raise ValueError(f"observe() needs a finite loss, got {loss!r}")
        self.history.append(float(loss))
        self.observed += 1
        if len(self.history) == self.window + self.horizon:
            h = np.fromiter(self.history, dtype=np.float64, count=self.window + self.horizon)
            x, m, sd = self.normalise(h[: self.window])
            y = min(max((float(h[self.window:].mean()) - m) / sd, -CLIP), CLIP)
            self._push(x, y)
        if self.size and self.observed % self.train_every == 0:
            self.train_step()

    def _inputs(self, windows: torch.Tensor) -> torch.Tensor:
        """``(K, B, W)`` normalised windows -> ``(B, W / patch, K * patch)`` packed input."""
        k, b, w = windows.shape
        x = windows.view(k, b, w // self.patch, self.patch).permute(1, 2, 0, 3)
        return x.reshape(b, w // self.patch, k * self.patch)

    def train_step(self) -> float:
        """One Adam step per net on its own bootstrap-weighted minibatch; returns the summed loss."""
        idx = self.rng.integers(0, self.size, size=(self.n_models, self.batch))
        with single_threaded():
            x = self._inputs(torch.from_numpy(self.buf_x[idx]))
            y = torch.from_numpy(self.buf_y[idx].T)
            w = torch.from_numpy(self.buf_w[idx, np.arange(self.n_models)[:, None]].T)
            # Each net's loss is its own weighted mean; summing them keeps the nets' gradients apart.
            err = (self.net(x) - y).square() * w
            loss = (err.sum(0) / w.sum(0).clamp_min(1.0)).sum()
            self.opt.zero_grad(set_to_none=False)
            loss.backward()
            self.net.mask_grads()
            self.opt.step()
        self.train_steps += 1
        return float(loss.detach())

    def predict(self) -> Forecast | None:
        """Forecast from the last ``window`` losses; None until that many were observed."""
        if len(self.history) < self.window:
            return None
        h = np.fromiter(self.history, dtype=np.float64, count=len(self.history))[-self.window:]
        u, m, sd = self.normalise(h)
        steps, k = self.window // self.patch, self.n_models
        # Every net reads the same window: repeat it across the K input column groups.
        x = torch.from_numpy(u.astype(np.float32)).view(steps, 1, self.patch).expand(steps, k, self.patch)
        with torch.no_grad(), single_threaded():
            pred = self.net(x.reshape(1, steps, k * self.patch))[0].tolist()
        mean = math.fsum(pred) / k
        var = math.fsum((p - mean) ** 2 for p in pred) / k
        return Forecast(mean=m + sd * mean, disagreement=var, per_model=[m + sd * p for p in pred])

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically, as plain data, arrays and tensors (copies)."""
        return {
            "history": list(self.history),
            "observed": self.observed,
            "train_steps": self.train_steps,
            "buffer": {"x": self.buf_x[: self.size].copy(), "y": self.buf_y[: self.size].copy(),
                       "w": self.buf_w[: self.size].copy(), "pos": self.pos},
            "net": _clone(dict(self.net.state_dict())),
            "optim": _clone(self.opt.state_dict()),
            "rng": _clone(self.rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` taken from an ensemble built with the same settings."""
        history = [float(v) for v in state["history"]]
        if len(history) > self.window + self.horizon:
            raise ValueError(f"forecaster history holds {len(history)} losses; at most "
                             f"{self.window + self.horizon} expected (window + horizon changed?)")
        buf = state["buffer"]
        size = len(buf["y"])
        if size > self.replay or np.shape(buf["x"]) != (size, self.window):
            raise ValueError(f"forecaster replay buffer of shape {np.shape(buf['x'])} does not fit "
                             f"replay={self.replay}, window={self.window}")
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(_clone(state["optim"]))
        self.history.clear()
        self.history.extend(history)
        self.observed = int(state["observed"])
        self.train_steps = int(state["train_steps"])
        self.buf_x[:] = 0
        self.buf_y[:] = 0
        self.buf_w[:] = 0
        self.buf_x[:size] = np.asarray(buf["x"], dtype=np.float32)
        self.buf_y[:size] = np.asarray(buf["y"], dtype=np.float32)
        self.buf_w[:size] = np.asarray(buf["w"], dtype=np.float32)
        self.size, self.pos = size, int(buf["pos"])
        self.rng.bit_generator.state = _clone(state["rng"])
