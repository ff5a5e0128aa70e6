"""PNG plots of training runs (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["plot_losses", "plot_compare", "smooth"]


def smooth(xs: Sequence[float], k: int = 10) -> list[float]:
    """Trailing moving average over k steps (the raw curve of small batches is noisy)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_losses(curves: Mapping[str, Sequence[float]], path, *, title: str = "training loss",
                resumed_at: int | None = None, offset: int = 0) -> Path:
    """Loss per step from step offset + 1 (0: the whole run; a resumed run's history comes from its
    checkpoint); a dotted line marks the step a run was resumed at."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for name, ys in curves.items():
        xs = range(offset + 1, offset + len(ys) + 1)
        line, = ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
        ax.plot(xs, smooth(ys), color=line.get_color(), label=f"{name} (10-step mean)")
    if resumed_at:
        ax.axvline(resumed_at + 0.5, color="grey", linestyle=":", linewidth=1, label=f"resumed at step {resumed_at}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (target tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_compare(eager: Mapping, fused: Mapping, path, *, title: str) -> Path:
    """Left: both loss curves; right: median step time (and peak memory when measured)."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=110, gridspec_kw={"width_ratios": [2, 1]})
    for name, run, style in (("eager", eager, "-"), ("fastbridge", fused, "--")):
        ys = run["losses"]
        a.plot(range(1, len(ys) + 1), smooth(ys), style, label=name)
    a.set_xlabel("step")
    a.set_ylabel("loss (10-step mean)")
    a.set_title(title)
    a.grid(alpha=0.3)
    a.legend()
    names = ["eager", "fastbridge"]
    ms = [eager["step_ms_median"] or 0.0, fused["step_ms_median"] or 0.0]
    bars = b.bar(names, ms, color=["#888888", "#2a7ab9"])
    for bar, v in zip(bars, ms):
        b.annotate(f"{v:.1f} ms", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom")
    b.set_ylabel("median step time (ms)")
    dev = eager.get("versions", {}).get("device", "")
    peaks = [eager.get("peak_mb"), fused.get("peak_mb")]
    sub = f"{dev}" + (f"\npeak MB: eager {peaks[0]:.0f}, fastbridge {peaks[1]:.0f}" if None not in peaks else "")
    b.set_title(sub, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
