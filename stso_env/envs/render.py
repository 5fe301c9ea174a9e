"""The ``rgb_array`` picture of STSO-GPT2-v0: loss, uncertainty index and actions on one timeline."""

from __future__ import annotations

from typing import Any

import numpy as np

_CLIP_COLORS = {"off": "#999999", "zclip": "#1f77b4", "arc": "#2ca02c", "spam": "#d62728"}


def timeline_rgb(history: dict[str, list[Any]], *, tau: float, budget: int) -> np.ndarray:
    """Render the env history as an (H, W, 3) uint8 array (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.asarray(history["global_step"])
    fig = Figure(figsize=(8, 6), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2, 1]})
    ax1.plot(x, history["train_loss"], lw=1, label="train loss")
    ax1.plot(x, history["probe_loss"], lw=1.5, label="probe loss")
    ev = [s for s, n in zip(x, history["events"]) if n]
    for s in ev:
        ax1.axvline(s, color="red", alpha=0.3, lw=1)
    ax1.set_ylabel("loss (nats)")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title("STSO-GPT2-v0: red lines = instability events")
    ax2.plot(x, history["index"], color="purple", lw=1)
    ax2.axhline(tau, color="black", ls="--", lw=0.8)
    trig = np.asarray(history["trigger"], dtype=bool)
    if trig.any():
        ax2.fill_between(x, 0, 1, where=trig, transform=ax2.get_xaxis_transform(), color="orange", alpha=0.3)
    ax2.set_ylabel("uncertainty")
    ax3.step(x, history["lr_scale"], where="post", color="black", lw=1)
    ax3.scatter(x, history["lr_scale"], c=[_CLIP_COLORS[c] for c in history["clip_policy"]], s=12, zorder=3)
    ax3.set_ylabel("LR scale")
    ax3.set_xlabel("training step (dot colour: clip policy off/ZClip/ARC/SPAM = grey/blue/green/red)")
    ax3.set_xlim(0, max(budget, int(x.max()) if len(x) else 1))
    fig.tight_layout()
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return img
