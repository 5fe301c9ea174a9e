"""Proxy world model: a bootstrapped ensemble of MLPs over (state, action).

Reference: 2017_Lakshminarayanan_DeepEnsembles (keys in ``assets/related_work.md``).

All ``E`` members live in stacked weight tensors ``(E, in, out)`` and run as one
batched matrix product, so scoring hundreds of candidate actions is a single
forward pass (branch scoring calls :meth:`ProxyEnsemble.predict` with ~500
candidates at a time). Each member sees its own bootstrap resample of the
training rows; the spread across members is the epistemic uncertainty that
:meth:`predict` reports as ``*_std``.

Heads per member: ``loss_at_n`` (regression, as a *change*: see below), divergence logit (binary),
instability risk (regression), recovery time (regression) and the next-state
*delta* (one entry per observation feature; predicting the change rather than the state keeps
the target centred and small). Inputs and regression targets are standardised
with statistics stored in the module, so a saved model is self-contained.

``loss_at_n`` is the probe loss ``N`` env steps ahead. When the state carries the probe loss
(the ``probe_loss`` observation feature, probe loss / ln vocab), the head regresses the *change*
``loss_at_n - probe_loss`` and :meth:`ProxyEnsemble.predict` adds the current probe loss back:
most of the variance of the level is where the run already is, which the state tells exactly,
and a network that must reproduce it wastes capacity and ranks candidates on noise. The nats per
feature unit (ln vocab) are measured at fit time from the logged ``probe_loss_before``.

``ProxyConfig.loss_model: trees`` (the default) replaces the loss head, mean and spread, with
:class:`stso_env.proxy.trees.TreeLossHead` (trees on the state plus a linear term in the plan's ordered
encoding, stored as arrays beside the weights); the divergence, risk, recovery and next-state heads stay
the MLP's, so the proxy env's transitions and rewards, and the policy learned in them, do not depend on
it. ``loss_model: mlp`` keeps the MLP's loss head. ``ProxyConfig.divergence_model: trees`` (default
``mlp``) likewise replaces the divergence probability and its spread with
:class:`stso_env.proxy.trees.TreeDivergenceHead` (trees on the state and the plan); the proxy env charges
its divergence penalty on that probability then.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stso_env.errors import ConfigError, DataError
from stso_env.monitor.monitor import OBSERVATION_NAMES
from stso_env.proxy.dataset import (ACTION_ENCODINGS, ACTION_NVEC, DIVERGENCE_MODELS, LOSS_MODELS, PLAN_NVEC,
                                    ProxyDataset, encode_actions, encoded_feature_names, encoded_width)
from stso_env.proxy.trees import DIVERGENCE_PREFIX as DIVERGENCE_TREES_PREFIX
from stso_env.proxy.trees import PREFIX as TREES_PREFIX
from stso_env.proxy.trees import TreeDivergenceHead, TreeLossHead

FORMAT_VERSION = 2
_N_SCALAR = 4  # loss, divergence logit, risk, recovery
_REG_SCALARS = (0, 2, 3)  # scalar heads trained by regression (1 is the logit)


#: Ridge penalties tried for the linear path, per training row (chosen on the validation runs)
RIDGE_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)

#: Huber transition point on standardised regression targets (in standard deviations)
HUBER_DELTA = 1.0


@dataclass
class ProxyConfig:
    """Architecture and training settings of the proxy ensemble."""

    horizon: int = 5  # env steps: 50 optimizer steps at the default decision interval
    hidden: int = 128
    layers: int = 2
    ensemble: int = 5
    lr: float = 2e-3
    weight_decay: float = 1e-4
    epochs: int = 200
    patience: int = 15
    batch: int = 256
    seed: int = 0
    # how the proxy sees an action (stso_env.proxy.dataset.ACTION_ENCODINGS)
    action_encoding: str = "one_hot"
    # the loss@N head: trees on the state plus a linear plan term ("trees", stso_env.proxy.trees) or the MLP
    # ensemble's ("mlp"); the other heads are the MLP's either way. On make train's collection and split the
    # trees' loss@N R² is 0.844 against the MLP's 0.624 (assets/results/proxy_baselines_trees)
    loss_model: str = "trees"
    # the divergence head: the MLP ensemble's logit ("mlp") or trees on the state and plan ("trees",
    # stso_env.proxy.trees.TreeDivergenceHead); on few diverging runs the trees rank divergence better
    # (assets/results/proxy_data_curve_unstable_trees)
    divergence_model: str = "mlp"

    def __post_init__(self) -> None:
        for name in ("horizon", "hidden", "layers", "ensemble", "epochs", "batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"proxy config {name}: must be an integer >= 1, got {v!r}")
        if not isinstance(self.patience, int) or self.patience < 0:
            raise ConfigError(f"proxy config patience: must be an integer >= 0, got {self.patience!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"proxy config lr: must be a positive finite number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"proxy config weight_decay: must be >= 0, got {self.weight_decay!r}")
        if self.action_encoding not in ACTION_ENCODINGS:
            raise ConfigError(f"proxy config action_encoding: {self.action_encoding!r} is not one of "
                              f"{list(ACTION_ENCODINGS)}")
        if self.loss_model not in LOSS_MODELS:
            raise ConfigError(f"proxy config loss_model: {self.loss_model!r} is not one of {list(LOSS_MODELS)}")
        if self.divergence_model not in DIVERGENCE_MODELS:
            raise ConfigError(f"proxy config divergence_model: {self.divergence_model!r} is not one of "
                              f"{list(DIVERGENCE_MODELS)}")


def _sanitize(x: np.ndarray) -> np.ndarray:
    # diverged runs log inf/NaN features; map them to large finite values so the
    # network sees "extreme" instead of poisoning every sum with NaN
    return np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0, posinf=1e6, neginf=-1e6)


class ProxyEnsemble(nn.Module):
    """``E`` MLP members (Linear -> LayerNorm -> GELU) x layers with five heads each."""

    def __init__(self, config: ProxyConfig, state_dim: int = len(OBSERVATION_NAMES),
                 nvec: tuple[int, ...] = ACTION_NVEC, state_names: list[str] | None = None) -> None:
        super().__init__()
        self.config = config
        self.state_dim = int(state_dim)
        self.nvec = tuple(int(v) for v in nvec)
        self.state_names = list(state_names) if state_names else [f"f{i}" for i in range(self.state_dim)]
        self.in_dim = self.state_dim + encoded_width(self.nvec, config.action_encoding)
        self.out_dim = _N_SCALAR + self.state_dim
        self.curve: list[dict[str, float]] = []
        e, h = config.ensemble, config.hidden
        gen = torch.Generator().manual_seed(config.seed)
        dims = [self.in_dim] + [h] * config.layers
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.ln_w = nn.ParameterList()
        self.ln_b = nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            self.weights.append(nn.Parameter(self._init(e, d_in, d_out, gen)))
            self.biases.append(nn.Parameter(torch.zeros(e, 1, d_out)))
            self.ln_w.append(nn.Parameter(torch.ones(e, 1, d_out)))
            self.ln_b.append(nn.Parameter(torch.zeros(e, 1, d_out)))
        self.head_w = nn.Parameter(torch.zeros(e, dims[-1], self.out_dim))  # see lin_w: start from "no change"
        self.head_b = nn.Parameter(torch.zeros(e, 1, self.out_dim))
        # a linear path from the standardised inputs straight to the heads, fitted in closed form (ridge)
        # before the MLP learns the rest: with a few hundred logged windows most of the signal is linear
        # (measured on 12 collected spiky episodes: ridge explains 94 % of the variance of the held-out
        # probe-loss change, the MLP alone 78-83 %)
        self.lin_w = nn.Parameter(torch.zeros(e, self.in_dim, self.out_dim), requires_grad=False)
        # normalisation statistics (buffers: saved with the weights, not trained)
        self.register_buffer("x_mean", torch.zeros(self.in_dim))
        self.register_buffer("x_std", torch.ones(self.in_dim))
        self.register_buffer("y_mean", torch.zeros(self.out_dim))
        self.register_buffer("y_std", torch.ones(self.out_dim))
        # nats per unit of the probe_loss feature; 0: the loss head predicts the level itself
        self.register_buffer("probe_scale", torch.zeros(()))
        self.probe_index = self.state_names.index("probe_loss") if "probe_loss" in self.state_names else -1
        self.loss_trees: TreeLossHead | None = None  # fitted by fit() when config.loss_model == "trees"
        self.divergence_trees: TreeDivergenceHead | None = None  # when config.divergence_model == "trees"
        # the tree head's linear plan term reads the ordered encoding whatever the MLP's: one slope per LR
        # and weight-decay factor; one coefficient per choice (one-hot) left x0.8's sign wrong on make train's
        # collection (agents.proxy_baselines)
        self.tree_encoding = ("ordered" if self.nvec in (tuple(ACTION_NVEC), tuple(PLAN_NVEC))
                              else config.action_encoding)

    @staticmethod
    def _init(e: int, d_in: int, d_out: int, gen: torch.Generator) -> torch.Tensor:
        # PyTorch's default Linear init (uniform +-1/sqrt(fan_in)), drawn from our own generator
        bound = 1.0 / math.sqrt(d_in)
        return (torch.rand(e, d_in, d_out, generator=gen) * 2 - 1) * bound

    @property
    def feature_names(self) -> list[str]:
        return self.state_names + encoded_feature_names(self.nvec, self.config.action_encoding)

    # ---------------------------------------------------------------- forward
    def loss_baseline(self, state: np.ndarray) -> np.ndarray:
        """The probe loss (nats) at each state, which the loss head predicts a change from; zeros when the
        model predicts levels (no ``probe_loss`` feature, or fitted without ``loss_before``)."""
        s = _sanitize(state)
        scale = float(self.probe_scale)
        if self.probe_index < 0 or scale == 0.0:
            return np.zeros(s.shape[0], dtype=np.float32)
        return (s[:, self.probe_index].astype(np.float64) * scale).astype(np.float32)

    def tree_loss(self, state: np.ndarray, action: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Loss@N mean and spread (nats) from the tree head for states and actions as :meth:`predict` takes
        them; None when the loss head is the MLP's."""
        if self.loss_trees is None:
            return None
        change, std = self.loss_trees.predict(_sanitize(state), encode_actions(np.asarray(action), self.nvec,
                                                                               self.tree_encoding))
        return (change + self.loss_baseline(state)).astype(np.float32), std.astype(np.float32)

    def _encode(self, state: np.ndarray, action: np.ndarray) -> torch.Tensor:
        s = _sanitize(state)
        if s.ndim != 2 or s.shape[1] != self.state_dim:
            raise DataError(f"state: expected shape (n, {self.state_dim}), got {s.shape}")
        a = np.asarray(action)
        if a.shape[0] != s.shape[0]:
            raise DataError(f"action: {a.shape[0]} rows for {s.shape[0]} states")
        return torch.from_numpy(np.concatenate([s, encode_actions(a, self.nvec, self.config.action_encoding)], axis=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw standardised outputs ``(E, B, out)`` for unstandardised inputs ``(B, in)`` or ``(E, B, in)``."""
        z = ((x - self.x_mean) / self.x_std).clamp(-10.0, 10.0)
        if z.dim() == 2:
            z = z.unsqueeze(0).expand(self.config.ensemble, -1, -1)
        inputs = z
        for w, b, lw, lb in zip(self.weights, self.biases, self.ln_w, self.ln_b):
            z = torch.baddbmm(b, z, w)
            z = nn.functional.layer_norm(z, z.shape[-1:]) * lw + lb
            z = nn.functional.gelu(z)
        return torch.baddbmm(self.head_b, z, self.head_w) + torch.bmm(inputs, self.lin_w)

    @torch.inference_mode()
    def predict(self, x: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
        """Ensemble mean and std of every head for states ``x (n, S)`` and actions ``a (n, D)``.

        Keys: ``loss_at_n``, ``diverged_prob``, ``instability_risk``, ``recovery_time`` (each ``(n,)``),
        ``next_state`` ``(n, S)``, and the same names with ``_std`` for the spread across members.
        """
        xt = self._encode(x, a)
        out = self(xt) * self.y_std + self.y_mean  # (E, n, out) in target units
        prob = torch.sigmoid(out[..., 1])
        nxt = out[..., _N_SCALAR:] + xt[:, : self.state_dim]  # delta -> absolute next state
        loss = out[..., 0] + torch.from_numpy(self.loss_baseline(x))  # change -> level
        res: dict[str, torch.Tensor] = {"loss_at_n": loss, "diverged_prob": prob,
                                        "instability_risk": out[..., 2], "recovery_time": out[..., 3],
                                        "next_state": nxt}
        result: dict[str, np.ndarray] = {}
        for k, v in res.items():
            result[k] = v.mean(0).numpy()
            result[k + "_std"] = v.std(0, unbiased=False).numpy()
        trees = self.tree_loss(x, a)
        if trees is not None:
            result["loss_at_n"], result["loss_at_n_std"] = trees
        div = self.tree_divergence(x, a)
        if div is not None:
            result["diverged_prob"], result["diverged_prob_std"] = div
        return result

    def tree_divergence(self, state: np.ndarray, action: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Divergence probability and its spread over the trees from the tree divergence head, for states and
        actions as :meth:`predict` takes them; None when the divergence head is the MLP's."""
        if self.divergence_trees is None:
            return None
        prob, spread = self.divergence_trees.predict(self._tree_inputs(state, action))
        return prob.astype(np.float32), spread.astype(np.float32)

    def _tree_inputs(self, state: np.ndarray, action: np.ndarray) -> np.ndarray:
        """The tree divergence head's inputs: the sanitised state, then the plan in the tree encoding."""
        return np.concatenate([_sanitize(state), encode_actions(np.asarray(action), self.nvec, self.tree_encoding)],
                              axis=1)

    # ---------------------------------------------------------------- training
    def _targets(self, ds: ProxyDataset) -> np.ndarray:
        y = np.zeros((len(ds), self.out_dim), dtype=np.float32)
        y[:, :_N_SCALAR] = ds.scalar_targets()
        with np.errstate(invalid="ignore", over="ignore"):
            y[:, 0] -= self.loss_baseline(ds.state)
        with np.errstate(invalid="ignore", over="ignore"):
            y[:, _N_SCALAR:] = ds.next_state.astype(np.float32) - _sanitize(ds.state)
        y[~np.isfinite(y)] = np.nan  # inf deltas too: NaN is what the statistics and the loss mask skip
        return y

    def _loss_head_error(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the ensemble-mean loss head on standardised targets (the early-stopping
        criterion: the head branch scores and the shield rank on)."""
        yz = (y[..., 0] - self.y_mean[0]) / self.y_std[0]
        mask = torch.isfinite(yz)
        err = torch.where(mask, pred[..., 0].mean(0) - torch.nan_to_num(yz), torch.zeros(()))
        return err.pow(2).sum() / mask.sum().clamp_min(1)

    def _loss(self, pred: torch.Tensor, y: torch.Tensor, *, with_state: bool = True) -> torch.Tensor:
        """Mean loss per member ``(E,)``: Huber on standardised regression targets + BCE on the logit;
        ``with_state=False`` leaves out the next-state heads (the early-stopping criterion)."""
        yz = (y - self.y_mean) / self.y_std
        mask = torch.isfinite(yz)
        err = torch.where(mask, pred - torch.nan_to_num(yz), torch.zeros(()))
        # Huber on standardised targets: diverged runs have losses and state jumps many standard
        # deviations out, and squared errors on them would drown the ordinary transitions
        a = err.abs()
        sq = torch.where(a <= HUBER_DELTA, 0.5 * err.pow(2), HUBER_DELTA * (a - 0.5 * HUBER_DELTA)) * 2.0
        reg = sum(sq[..., i].mean(-1) for i in _REG_SCALARS)
        bce = nn.functional.binary_cross_entropy_with_logits(
            pred[..., 1], y[..., 1].expand_as(pred[..., 1]), reduction="none").mean(-1)
        if not with_state:
            return reg + bce
        state_mask = mask[..., _N_SCALAR:].float()
        reg = reg + (sq[..., _N_SCALAR:].sum((-1, -2)) / state_mask.sum((-1, -2)).clamp_min(1.0))
        return reg + bce

    def fit(self, train: ProxyDataset, valid: ProxyDataset,
            progress: Callable[[int, float, float], None] | None = None) -> list[dict[str, float]]:
        """Train all members on bootstrap resamples of ``train``; early-stop on the loss head's error on ``valid``.

        ``progress(epoch, train_loss, valid_loss)`` is called after every epoch. The weights of
        the best validation epoch are restored. Returns the training curve (also kept in ``curve``).
        """
        if len(train) == 0 or len(valid) == 0:
            raise DataError(f"proxy fit: empty {'train' if len(train) == 0 else 'validation'} set; "
                            "log more runs or change the split")
        if train.state.shape[1] != self.state_dim:
            raise DataError(f"proxy fit: train state has {train.state.shape[1]} features, model expects "
                            f"{self.state_dim}")
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.probe_scale.fill_(self._fit_probe_scale(train))
        x = self._encode(train.state, train.action)
        y = torch.from_numpy(self._targets(train))
        xv = self._encode(valid.state, valid.action)
        yv = torch.from_numpy(self._targets(valid))
        with torch.no_grad():
            self.x_mean.copy_(x.mean(0))
            self.x_std.copy_(x.std(0).clamp_min(1e-3))
            ym = torch.nanmean(y, 0)
            yc = torch.where(torch.isfinite(y), y - ym, torch.zeros(()))
            ys = (yc.pow(2).sum(0) / torch.isfinite(y).sum(0).clamp_min(1)).sqrt().clamp_min(1e-3)
            ym[1], ys[1] = 0.0, 1.0  # the divergence column is a 0/1 label for BCE, never standardised
            self.y_mean.copy_(torch.nan_to_num(ym))
            self.y_std.copy_(ys)
        n, e = x.shape[0], cfg.ensemble
        boot = torch.randint(0, n, (e, n), generator=gen)  # each member's bootstrap resample
        self._fit_linear(x, y, boot, xv, yv)
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=cfg.lr,
                                weight_decay=cfg.weight_decay)
        self.eval()
        with torch.no_grad():  # the linear path alone is a candidate too: the MLP must beat it
            best = float(self._loss_head_error(self(xv), yv))
        best_state, bad = {k: v.detach().clone() for k, v in self.state_dict().items()}, 0
        self.curve = []
        for epoch in range(cfg.epochs):
            self.train()
            perm = boot.gather(1, torch.argsort(torch.rand(e, n, generator=gen), dim=1))
            total = 0.0
            for start in range(0, n, cfg.batch):
                idx = perm[:, start:start + cfg.batch]  # (E, B): a different batch per member
                loss = self._loss(self(x[idx]), y[idx]).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.shape[1] / e
            self.eval()
            with torch.no_grad():
                # early stopping watches the loss head, which branch scores and the shield rank on: the
                # next-state heads overfit sooner, and stopping on them left it under-fitted (held-out R²
                # of the probe-loss change on 16 collected runs: 0.60-0.82 against 0.65-0.72)
                vloss = float(self._loss_head_error(self(xv), yv))
            tloss = total / n
            self.curve.append({"epoch": epoch, "train_loss": tloss, "valid_loss": vloss})
            if progress is not None:
                progress(epoch, tloss, vloss)
            if vloss < best - 1e-4:
                best, bad = vloss, 0
                best_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
            else:
                bad += 1
                if bad > cfg.patience:
                    break
        if best_state is not None:
            self.load_state_dict(best_state)
        self.eval()
        if cfg.loss_model == "trees":
            self._fit_trees(train, valid)
        if cfg.divergence_model == "trees":
            label = np.concatenate([train.diverged_at_n, valid.diverged_at_n])
            self.divergence_trees = TreeDivergenceHead().fit(
                np.concatenate([self._tree_inputs(train.state, train.action),
                                self._tree_inputs(valid.state, valid.action)]), label, seed=cfg.seed)
        return self.curve

    def _fit_trees(self, train: ProxyDataset, valid: ProxyDataset) -> None:
        """The tree loss head on the training and validation rows with a finite change target (the MLP uses
        the validation rows only to stop early; the trees need no stopping and take every row)."""
        state = np.concatenate([_sanitize(train.state), _sanitize(valid.state)])
        action = np.concatenate([train.action, valid.action])
        with np.errstate(invalid="ignore", over="ignore"):
            change = np.concatenate([self._targets(train)[:, 0], self._targets(valid)[:, 0]]).astype(np.float64)
        ok = np.isfinite(change)
        if ok.sum() < 3:
            raise DataError(f"proxy fit: {int(ok.sum())} rows with a finite loss@N; the tree loss head needs 3")
        self.loss_trees = TreeLossHead().fit(state[ok], encode_actions(action[ok], self.nvec, self.tree_encoding),
                                             change[ok], seed=self.config.seed)

    @torch.no_grad()
    def _fit_linear(self, x: torch.Tensor, y: torch.Tensor, boot: torch.Tensor, xv: torch.Tensor,
                    yv: torch.Tensor) -> None:
        """Ridge regression of every regression head on the standardised inputs, per member on its bootstrap
        rows, into ``lin_w``; the penalty is chosen among :data:`RIDGE_ALPHAS` (times the rows) on ``valid``.
        The divergence logit gets a logistic regression instead (:meth:`_fit_logistic`)."""
        z = ((x - self.x_mean) / self.x_std).clamp(-10.0, 10.0)
        yz = (y - self.y_mean) / self.y_std
        yz = torch.where(torch.isfinite(yz), yz, torch.zeros(()))  # a missing target pulls towards the mean
        yz[:, 1] = 0.0
        zb, yb = z[boot], yz[boot]  # (E, n, in), (E, n, out)
        gram = zb.transpose(1, 2) @ zb
        rhs = zb.transpose(1, 2) @ yb
        eye = torch.eye(self.in_dim)
        n = x.shape[0]
        best, best_w = float("inf"), None
        for alpha in RIDGE_ALPHAS:
            w = torch.linalg.solve(gram.double() + alpha * n * eye.double(), rhs.double()).float()
            self.lin_w.copy_(w)
            # the MLP's head starts at zero, so this is the linear model alone
            v = float(self._loss_head_error(self(xv), yv))
            if v < best:
                best, best_w = v, w
        self.lin_w.copy_(best_w)
        self._fit_logistic(z, y[:, 1], boot, xv, yv)

    @torch.no_grad()
    def _fit_logistic(self, z: torch.Tensor, label: torch.Tensor, boot: torch.Tensor, xv: torch.Tensor,
                      yv: torch.Tensor) -> None:
        """L2-penalised logistic regression (scikit-learn) of the divergence label on the standardised
        inputs, per member on its bootstrap rows, into the logit's linear path (``lin_w``) and bias
        (``head_b``); the penalty is chosen among :data:`RIDGE_ALPHAS` on the validation rows' log loss.

        Without it the logit had only the MLP, and early stopping, which watches the loss head, often
        restores an epoch before the MLP learned it: on 16 collected ``unstable`` runs the proxy then
        predicted 0.5 for every row (AUROC 0.5). Where there is nothing to regress on (a collection without
        divergences, or a member whose resample holds one class) the bias starts at the log-odds of the
        smoothed rate instead, ``(k + 1/2) / (n + 1)`` for ``k`` divergences in ``n`` rows (the
        Krichevsky-Trofimov estimate), and the MLP learns from there. From a bias of 0 the head predicted 0.5
        until the MLP had learned otherwise, and an early stop left it near 0.38 on a collection of 24 runs
        without a divergence: the proxy env then charged every step 10 x 0.38 of divergence penalty."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        def base_logit(values: np.ndarray) -> float:
            rate = (float(values.sum()) + 0.5) / (len(values) + 1.0)
            return float(np.log(rate / (1.0 - rate)))

        lab = label.numpy()
        ok = np.isfinite(lab)
        self.lin_w[:, :, 1] = 0.0
        if not ok.any() or len(np.unique(lab[ok])) < 2:
            self.head_b[:, 0, 1] = base_logit(lab[ok])
            return
        zn, bn = z.double().numpy(), boot.numpy()
        n, e = z.shape[0], boot.shape[0]
        yl = torch.nan_to_num(yv[:, 1]).clamp(0.0, 1.0)
        best, best_wb = float("inf"), None
        for alpha in RIDGE_ALPHAS:
            w = torch.zeros(e, self.in_dim)
            b = torch.zeros(e)
            for m in range(e):
                rows = bn[m][ok[bn[m]]]
                if len(np.unique(lab[rows])) < 2:
                    b[m] = base_logit(lab[rows])
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    fit = LogisticRegression(C=1.0 / (alpha * n), max_iter=500).fit(zn[rows], lab[rows])
                w[m] = torch.from_numpy(fit.coef_[0]).float()
                b[m] = float(fit.intercept_[0])
            self.lin_w[:, :, 1] = w
            self.head_b[:, 0, 1] = b
            logit = self(xv)[..., 1].mean(0)
            v = float(nn.functional.binary_cross_entropy_with_logits(logit, yl))
            if v < best:
                best, best_wb = v, (w, b)
        self.lin_w[:, :, 1] = best_wb[0]
        self.head_b[:, 0, 1] = best_wb[1]

    def _fit_probe_scale(self, ds: ProxyDataset) -> float:
        """Nats per unit of the ``probe_loss`` feature (ln vocab), measured on the logged rows; 0 when the
        dataset cannot tell (no such feature or no ``loss_before``): the head then predicts levels."""
        if self.probe_index < 0 or ds.loss_before is None:
            return 0.0
        feat = ds.state[:, self.probe_index].astype(np.float64)
        before = ds.loss_before.astype(np.float64)
        ok = np.isfinite(before) & np.isfinite(feat) & (feat > 0) & (feat < 99.0)  # 100: a clipped divergence
        if not ok.any():
            return 0.0
        ratio = before[ok] / feat[ok]
        mid = float(np.median(ratio))
        if float(np.max(np.abs(ratio - mid))) > 1e-3 * mid:
            raise DataError(f"proxy fit: the probe_loss feature is probe loss / {ratio.min():.4f}..{ratio.max():.4f} "
                            "nats across rows; the log mixes tokenizers (vocabularies). Train one proxy per "
                            "tokenizer")
        return mid

    # ---------------------------------------------------------------- persistence
    def metadata(self) -> dict[str, Any]:
        """The JSON-able description written to ``proxy.json``."""
        return {
            "format_version": FORMAT_VERSION,
            "state_names": self.state_names,
            "feature_names": self.feature_names,
            "target_names": ["loss_at_n", "diverged_at_n", "instability_risk", "recovery_time", "next_state"],
            "action_nvec": list(self.nvec),
            "tree_encoding": (self.tree_encoding if self.loss_trees is not None or self.divergence_trees is not None
                              else None),
            "loss_head": ("change from the probe_loss feature x probe_scale (nats)" if float(self.probe_scale)
                          else "level (nats)") + (f", trees on the state + a linear plan term ({self.tree_encoding} "
                                                  "encoding)" if self.config.loss_model == "trees" else ""),
            "normalisation": {k: getattr(self, k).tolist() for k in ("x_mean", "x_std", "y_mean", "y_std")},
            "config": asdict(self.config),
            "training_curve": self.curve,
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``proxy.safetensors`` (weights, no pickle) and ``proxy.json`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        for head in (self.loss_trees, self.divergence_trees):
            if head is not None:
                tensors.update(head.tensors())
        save_file(tensors, str(d / "proxy.safetensors"))
        (d / "proxy.json").write_text(json.dumps(self.metadata(), indent=1), encoding="utf-8")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> ProxyEnsemble:
        """Rebuild a model written by :meth:`save`."""
        d = Path(directory)
        meta_path, w_path = d / "proxy.json", d / "proxy.safetensors"
        for p in (meta_path, w_path):
            if not p.exists():
                raise DataError(f"{p}: missing; point to a folder written by ProxyEnsemble.save / agents.train_proxy")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{meta_path}: format_version {meta.get('format_version')!r}, this code reads "
                            f"{FORMAT_VERSION}; retrain the proxy")
        known = {f.name for f in fields(ProxyConfig)}
        # a proxy saved before the tree head existed has no loss_model: its loss head is the MLP's
        cfg = ProxyConfig(**{"loss_model": "mlp", **{k: v for k, v in meta["config"].items() if k in known}})
        model = cls(cfg, state_dim=len(meta["state_names"]), nvec=tuple(meta["action_nvec"]),
                    state_names=meta["state_names"])
        tensors = load_file(str(w_path))
        if meta.get("tree_encoding"):  # saved after fit() with a tree head (never fitted: the MLP's heads)
            model.tree_encoding = meta["tree_encoding"]
            if cfg.loss_model == "trees":
                model.loss_trees = TreeLossHead.from_tensors(tensors, str(w_path))
            if cfg.divergence_model == "trees":
                model.divergence_trees = TreeDivergenceHead.from_tensors(tensors, str(w_path))
        try:
            model.load_state_dict({k: v for k, v in tensors.items()
                                   if not k.startswith((TREES_PREFIX, DIVERGENCE_TREES_PREFIX))})
        except RuntimeError as err:
            raise DataError(f"{w_path}: weights do not match {meta_path} ({err}); re-save the model") from err
        model.curve = list(meta.get("training_curve", []))
        model.eval()
        return model
