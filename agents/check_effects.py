"""Check the proxy's predicted intervention effects against real forked training.

``python -m agents.check_effects --proxy RUN/proxy [--scenarios calm,spiky,attn_logit] [--seeds 2]``

A proxy can fit loss@N well and still rank interventions wrongly; the policy's shield and the
branch method only need the ranking. This program measures it directly. For every scenario and
seed, a real STSO-GPT2-v0 run trains under the neutral action; at each of ``--windows`` it forks
one copy per single change from the neutral action (:data:`stso_env.proxy.effects.DEVIATIONS`)
plus one neutral copy, and runs each for the proxy's horizon ``N`` windows under the plan the
proxy scores (the change now, then its settings held: :func:`stso_env.proxy.dataset.hold_continuation`).
The *real effect* of a change is its probe loss ``N`` windows later minus the neutral copy's;
the *predicted effect* is the proxy's, from the same state.

Reported (``OUT/effects.json``, ``OUT/report.md``):

* per change: mean real and predicted effect, and the share of fork points where their signs agree;
* per fork point: the Spearman rank correlation between real and predicted effects, and the real
  effect of the proxy's best choice against the real best (the regret of acting on the proxy);
* a fork check: the neutral copy's probe loss equals the main run's ``N`` windows later (forks are
  exact), so every difference is the intervention's.

Short measures against the end of the run (``--to-end``): which one ranks a change as the end of the
run does. ``--cooldown W`` scores each fork after a further ``W`` windows of LR cooldown (a fork's
worth of extra training per candidate); ``--ema DECAY`` scores the probe loss of an exponential
moving average of the weights at ``+N`` (:class:`stso_env.train.weight_average.WeightEMA`, kept
from the run's first step; no extra training).

Only the probe split is read (what the proxy predicts); seeds default to 300000 and up, apart
from the collection seeds (0 and up) and the evaluation suites' (100000 and up).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from stso_env.envs.gpt2_env import NEUTRAL_ACTION
from stso_env.errors import ConfigError, STSOError

NEUTRAL = np.asarray(NEUTRAL_ACTION, dtype=np.int64)


def _run(env: Any, actions: Any, windows: int) -> float:
    """Step ``env`` ``windows`` times (``actions(w)`` gives window ``w``'s action); the last probe loss, or
    ``inf`` when the run diverged or ended first."""
    loss = math.inf
    for w in range(windows):
        _, _, terminated, truncated, info = env.step(actions(w))
        loss = float(info.get("probe_loss", math.inf))
        if terminated or (truncated and w < windows - 1):
            return math.inf
    return loss if math.isfinite(loss) else math.inf


def cooled_loss(env: Any, windows: int) -> float:
    """The probe loss after a cooldown of a fork of ``env``: its LR scale falls linearly towards zero
    over ``windows`` windows under the neutral action. Comparing runs after the same cooldown
    compares the progress they made, not how far each has already annealed: a lower LR lowers the
    loss soon and can still end a run higher (short-horizon bias)."""
    fork = env.fork()
    try:
        start = float(fork.trainer.knobs.lr_scale)

        def anneal(w: int) -> np.ndarray:
            fork.trainer.knobs.lr_scale = start * (1.0 - (w + 1) / (windows + 1))
            return NEUTRAL
        return _run(fork, anneal, windows)
    finally:
        fork.close()


def real_effects(env: Any, candidates: np.ndarray, horizon: int, cooldown: int = 0,
                 to_end: bool = False, ema: Any = None) -> dict[str, np.ndarray]:
    """Real outcomes of forking ``env`` once per candidate plan (first action, then
    :func:`hold_continuation`), each an array over the candidates (``inf`` where a fork diverged):

    * ``"at_n"``: the probe loss ``horizon`` windows later;
    * ``"cooled"`` (``cooldown > 0``): the probe loss after a further cooldown (:func:`cooled_loss`);
    * ``"end"`` (``to_end``): the probe loss at the end of the run, the neutral action after the horizon;
    * ``"ema"`` (``ema``, the main run's :class:`~stso_env.train.weight_average.WeightEMA`): the probe
      loss of the averaged weights ``horizon`` windows later, each fork continuing the main run's average.
    """
    from stso_env.proxy.dataset import hold_continuation
    from stso_env.train.weight_average import WeightEMA

    out = {"at_n": np.full(len(candidates), np.inf)}
    if cooldown:
        out["cooled"] = np.full(len(candidates), np.inf)
    if to_end:
        out["end"] = np.full(len(candidates), np.inf)
    if ema is not None:
        out["ema"] = np.full(len(candidates), np.inf)
    for i, first in enumerate(candidates):
        fork = env.fork()
        try:
            fork_ema = None if ema is None else WeightEMA(ema.decay).attach(fork.trainer, start=ema)
            then = hold_continuation(first)[0]
            out["at_n"][i] = _run(fork, lambda w, a=first, b=then: a if w == 0 else b, horizon)
            if not math.isfinite(out["at_n"][i]):
                continue
            if fork_ema is not None:
                out["ema"][i] = fork_ema.probe_loss()
                fork_ema.detach()
            if cooldown:
                out["cooled"][i] = cooled_loss(fork, cooldown)
            if to_end:
                left = (fork.episode_steps - fork.trainer.global_step) // fork.decision_interval
                out["end"][i] = _run(fork, lambda w: NEUTRAL, left) if left > 0 else out["at_n"][i]
        finally:
            fork.close()
    return out


def point_summary(real: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """One fork point: effects (candidate minus neutral) real and predicted, their Spearman correlation
    (``None`` when either is constant or a fork diverged) and the regret of the proxy's best choice."""
    from scipy.stats import spearmanr

    ok = np.isfinite(real)
    rho = None
    if ok.all() and np.ptp(real) > 0 and np.ptp(predicted) > 0:
        rho = float(spearmanr(real, predicted).statistic)
    # choices: the neutral action (effect 0) and every change; a diverged fork is the worst choice
    real_all = np.concatenate([[0.0], np.where(ok, real, np.inf)])
    pred_all = np.concatenate([[0.0], predicted])
    chosen = int(np.argmin(pred_all))
    return {"spearman": rho, "chosen": chosen, "chosen_real_effect": float(real_all[chosen]),
            "best_real_effect": float(real_all.min()), "regret": float(real_all[chosen] - real_all.min())}


def check(proxy_dir: Path, scenarios: Sequence[str], seeds: Sequence[int], windows: Sequence[int], *,
          episode_steps: int = 600, decision_interval: int = 10, preset: str = "tiny", corpus: str = "builtin",
          changes: Sequence[str] | None = None, cooldown: int = 0, to_end: bool = False,
          ema_decay: float = 0.0, progress: bool = True) -> dict[str, Any]:
    """Fork real runs at ``windows`` and compare real with predicted effects (see the module docstring);
    ``changes``: names from :data:`~stso_env.proxy.effects.DEVIATIONS` (default all); ``cooldown``,
    ``to_end`` and ``ema_decay`` (0: off): also the effects after a cooldown, at the end of the run and
    on averaged weights (:func:`real_effects`)."""
    import gymnasium as gym

    import stso_env  # noqa: F401  (registers the envs)
    from stso_env.proxy.dataset import PLAN_NVEC, as_plan
    from stso_env.proxy.effects import DEVIATIONS
    from stso_env.proxy.model import ProxyEnsemble
    from stso_env.train.weight_average import WeightEMA

    model = ProxyEnsemble.load(proxy_dir)
    horizon = int(model.config.horizon)
    n_windows = episode_steps // decision_interval
    if max(windows) + horizon > n_windows:
        raise ConfigError(f"--windows: the last fork point {max(windows)} plus the proxy's horizon {horizon} "
                          f"passes the run's {n_windows} windows; lower it or raise --episode-steps")
    known = dict(DEVIATIONS)
    names = list(changes) if changes else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--changes: {unknown} unknown; choose among {', '.join(known)}")
    cands = np.asarray([known[n] for n in names], dtype=np.int64)
    plans = np.concatenate([NEUTRAL[None], cands])
    scored = as_plan(plans) if tuple(model.nvec) == tuple(PLAN_NVEC) else plans
    points: list[dict[str, Any]] = []
    fork_gaps: list[float] = []
    bar = tqdm(total=len(scenarios) * len(seeds) * len(windows), desc="fork points", unit="point",
               file=sys.stderr, disable=not progress)
    for scenario in scenarios:
        for seed in seeds:
            env = gym.make("STSO-GPT2-v0", preset=preset, scenario=scenario, corpus=corpus,
                           decision_interval=decision_interval, episode_steps=episode_steps).unwrapped
            obs, _ = env.reset(seed=int(seed))
            ema = WeightEMA(ema_decay).attach(env.trainer) if ema_decay else None
            pending: dict[int, float] = {}  # window at which the main run's probe loss is compared -> neutral fork's
            for w in range(max(windows) + horizon):
                if w in windows:
                    outcomes = real_effects(env, plans, horizon, cooldown, to_end, ema)
                    real = outcomes["at_n"]
                    pred = model.predict(np.repeat(obs[None].astype(np.float32), len(plans), axis=0),
                                         scored)["loss_at_n"].astype(np.float64)
                    eff_real, eff_pred = real[1:] - real[0], pred[1:] - pred[0]
                    point = {"scenario": scenario, "seed": int(seed), "window": int(w),
                             "neutral_probe_loss": float(real[0]), "real": eff_real.tolist(),
                             "predicted": eff_pred.tolist(), **point_summary(eff_real, eff_pred)}
                    for key in ("cooled", "end", "ema"):
                        if key in outcomes:
                            point[f"real_{key}"] = (outcomes[key][1:] - outcomes[key][0]).tolist()
                    points.append(point)
                    pending[w + horizon] = float(real[0])
                    bar.update(1)
                obs, _, terminated, truncated, info = env.step(NEUTRAL)
                if w + 1 in pending:
                    fork_gaps.append(abs(float(info["probe_loss"]) - pending.pop(w + 1)))
                if terminated or truncated:
                    break
            env.close()
    bar.close()
    return summarise(points, names, fork_gaps, horizon)


def summarise(points: list[dict[str, Any]], names: list[str], fork_gaps: list[float],
              horizon: int) -> dict[str, Any]:
    """Per-change and overall figures of :func:`check`'s fork points."""
    real = np.asarray([p["real"] for p in points], dtype=np.float64)
    pred = np.asarray([p["predicted"] for p in points], dtype=np.float64)
    per_change = {}
    for j, name in enumerate(names):
        ok = np.isfinite(real[:, j])
        per_change[name] = {
            "real_mean": float(real[ok, j].mean()) if ok.any() else None,
            "predicted_mean": float(pred[:, j].mean()),
            "sign_agreement": float((np.sign(real[ok, j]) == np.sign(pred[ok, j])).mean()) if ok.any() else None,
            "diverged": int((~ok).sum())}
        for key in ("cooled", "end", "ema"):
            if points and f"real_{key}" in points[0]:
                per_change[name][f"{key}_mean"] = _finite_mean([p[f"real_{key}"][j] for p in points])
        if points and "real_end" in points[0]:
            end = np.asarray([p["real_end"][j] for p in points])
            shorter = {"at_n": real[:, j]}
            for key in ("cooled", "ema"):
                if f"real_{key}" in points[0]:
                    shorter[key] = np.asarray([p[f"real_{key}"][j] for p in points])
            for key, v in shorter.items():
                both = np.isfinite(v) & np.isfinite(end)
                per_change[name][f"{key}_sign_as_end"] = (float((np.sign(v[both]) == np.sign(end[both])).mean())
                                                          if both.any() else None)
    rhos = [p["spearman"] for p in points if p["spearman"] is not None]
    by_scenario = {}
    for sc in dict.fromkeys(p["scenario"] for p in points):
        sel = [p for p in points if p["scenario"] == sc]
        r = [p["spearman"] for p in sel if p["spearman"] is not None]
        by_scenario[sc] = {"points": len(sel), "spearman_mean": float(np.mean(r)) if r else None,
                           "regret_mean": float(np.mean([p["regret"] for p in sel])),
                           "chosen_real_effect_mean": float(np.mean([p["chosen_real_effect"] for p in sel])),
                           "best_real_effect_mean": float(np.mean([p["best_real_effect"] for p in sel]))}
    return {"horizon": horizon, "changes": names, "points": points, "per_change": per_change,
            "spearman_mean": float(np.mean(rhos)) if rhos else None, "by_scenario": by_scenario,
            "regret_mean": float(np.mean([p["regret"] for p in points])) if points else None,
            "fork_max_abs_gap": float(max(fork_gaps)) if fork_gaps else None}


def _finite_mean(values: Sequence[float]) -> float | None:
    v = np.asarray(values, dtype=np.float64)
    return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else None


def _f(x: Any, digits: int = 3, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def write_report(result: dict[str, Any], out: Path, meta: dict[str, Any]) -> Path:
    """``out/report.md`` from a :func:`check` result."""
    n = result["horizon"]
    m = meta.get("machine", {})
    lines = ["# Proxy effects against real forks", "",
             f"Command: `{meta['command']}`  ", f"Commit: `{meta.get('commit')}`  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()) + "  ",
             f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores", "",
             f"Proxy `{meta['proxy']}` (sha256 `{str(meta.get('proxy_sha256'))[:16]}`, horizon {n} windows); "
             f"scenarios {', '.join(meta['scenarios'])}; seeds "
             f"{meta['seeds']}; fork windows {meta['windows']}; {meta['seconds']:.0f} s. Effect = probe loss {n} "
             "windows after the fork under the change, minus under the neutral action (nats; negative helps).", "",
             "Fork check: the neutral copy's probe loss differs from the main run's by at most "
             + ("n/a" if result["fork_max_abs_gap"] is None else f"{result['fork_max_abs_gap']:.3g}") + " nats.", "",
             "| scenario | fork points | Spearman (real vs predicted effects), mean | real effect of the proxy's "
             "best choice | real effect of the best choice | regret |", "| --- | --- | --- | --- | --- | --- |"]
    for sc, s in result["by_scenario"].items():
        lines.append(f"| `{sc}` | {s['points']} | {_f(s['spearman_mean'], 2, True)} | "
                     f"{_f(s['chosen_real_effect_mean'], 4, True)} | {_f(s['best_real_effect_mean'], 4, True)} | "
                     f"{_f(s['regret_mean'], 4)} |")
    lines += ["", f"All fork points: mean Spearman {_f(result['spearman_mean'], 2, True)}, mean regret "
                  f"{_f(result['regret_mean'], 4)} nats.", "",
              "| change | real effect, mean | predicted effect, mean | signs agree | forks diverged |",
              "| --- | --- | --- | --- | --- |"]
    for name, c in result["per_change"].items():
        agree = "n/a" if c["sign_agreement"] is None else f"{c['sign_agreement']:.0%}"
        lines.append(f"| `{name}` | {_f(c['real_mean'], 4, True)} | {_f(c['predicted_mean'], 4, True)} | {agree} | "
                     f"{c['diverged']} |")
    first = result["per_change"][result["changes"][0]] if result["changes"] else {}
    if "end_mean" in first:
        ema = f"averaged weights (EMA decay {meta['ema']}) at +N" if meta.get("ema") else "averaged weights at +N"
        lines += ["", f"Which short measure ranks a change as the end of the run does (real effects, mean over fork "
                      f"points; the share of fork points where the sign of the short measure is the sign at the "
                      f"end). Cooldown: {meta.get('cooldown', 0)} windows with the LR scale falling linearly to "
                      "zero, after the horizon" + (f"; {ema}: the probe loss of an exponential moving average of "
                                                    "the weights, kept from the run's first step"
                                                    if meta.get("ema") else "") + ".", "",
                  f"| change | at +N | after cooldown | {ema} | at the end of the run | sign at +N as at the end | "
                  f"sign after cooldown as at the end | sign of {ema} as at the end |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, c in result["per_change"].items():
            def share(key: str, c: dict[str, Any] = c) -> str:
                v = c.get(key)
                return "n/a" if v is None else f"{v:.0%}"
            lines.append(f"| `{name}` | {_f(c['real_mean'], 4, True)} | {_f(c.get('cooled_mean'), 4, True)} | "
                         f"{_f(c.get('ema_mean'), 4, True)} | {_f(c['end_mean'], 4, True)} | "
                         f"{share('at_n_sign_as_end')} | {share('cooled_sign_as_end')} | {share('ema_sign_as_end')} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m agents.check_effects", description=__doc__.split("\n\n")[0])
    p.add_argument("--proxy", required=True, help="proxy folder (agents.train_proxy / agents.train_controller)")
    p.add_argument("--scenarios", default="calm,spiky,attn_logit", help="comma-separated scenarios")
    p.add_argument("--seeds", type=int, default=2, help="real runs per scenario")
    p.add_argument("--seed-offset", type=int, default=300_000, help="first seed (apart from collection and suites)")
    p.add_argument("--windows", default="5,12,20,40", help="comma-separated env steps at which to fork")
    p.add_argument("--changes", default=None,
                   help="comma-separated changes to fork (default: every single change, see stso_env.proxy.effects)")
    p.add_argument("--cooldown", type=int, default=0,
                   help="also measure each fork after a cooldown of this many windows (LR scale linearly to zero)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="also measure each fork's probe loss on an exponential moving average of the weights at +N, "
                        "with this decay per optimizer step (e.g. 0.98; 0: off)")
    p.add_argument("--to-end", action="store_true",
                   help="also run each fork to the end of the run under the neutral action (slow): the outcome the "
                        "short measures stand in for")
    p.add_argument("--episode-steps", type=int, default=600, help="optimizer steps of a run")
    p.add_argument("--decision-interval", type=int, default=10, help="optimizer steps per env step")
    p.add_argument("--preset", default="tiny", help="GPT-2 preset")
    p.add_argument("--corpus", default="builtin", help="corpus")
    p.add_argument("--out", default="runs/effects", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        try:
            windows = sorted({int(w) for w in args.windows.split(",") if w.strip()})
        except ValueError:
            raise ConfigError(f"--windows {args.windows!r}: comma-separated integers, e.g. 5,20,40") from None
        if not windows or windows[0] < 0:
            raise ConfigError(f"--windows {args.windows!r}: need at least one window >= 0")
        if args.seeds < 1:
            raise ConfigError(f"--seeds {args.seeds}: need at least 1")
        if args.cooldown < 0:
            raise ConfigError(f"--cooldown {args.cooldown}: windows, 0 or more")
        if not (args.ema == 0 or 0 < args.ema < 1):
            raise ConfigError(f"--ema {args.ema}: a decay per optimizer step in (0, 1), e.g. 0.98; 0 turns it off")
        changes = [c.strip() for c in args.changes.split(",") if c.strip()] if args.changes else None
        scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        seeds = [args.seed_offset + i for i in range(args.seeds)]
        t0 = time.perf_counter()
        result = check(Path(args.proxy), scenarios, seeds, windows, episode_steps=args.episode_steps,
                       decision_interval=args.decision_interval, preset=args.preset, corpus=args.corpus,
                       changes=changes, cooldown=args.cooldown, to_end=args.to_end, ema_decay=args.ema,
                       progress=not args.no_progress)
        from agents.evaluate import provenance
        from stso_env.files import content_digest

        meta = {"proxy": args.proxy, "proxy_sha256": content_digest(args.proxy), "scenarios": scenarios,
                "seeds": seeds, "windows": windows, "cooldown": args.cooldown, "to_end": args.to_end,
                "ema": args.ema, "seconds": time.perf_counter() - t0, **provenance("agents.check_effects", argv)}
        from stso_env.eval.report import save_result

        report = save_result(Path(args.out), "effects.json", meta, result, write_report)
    except STSOError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
