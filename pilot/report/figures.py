"""The report's figures (matplotlib, Agg): each function takes the computed summary and series, writes one
PNG and returns its path. No numbers are computed here that the summary does not already hold."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DPI = 100
REGIME_COLORS = {"paused": "#d9d9d9", "solo": "#f6d08b", "federated": "#a9d6a0"}
WINDOW_COLOR = "#bfe3f5"
TRAIN_COLOR = "#1f5f99"
SITE_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
CENTRAL_COLOR = "black"
SITES_BATCH_COLOR = "#9467bd"   # the centralized baseline with the sites' batch


def _plt():
    import matplotlib  # noqa: PLC0415 - only for pictures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _days(seconds: float) -> float:
    """Matplotlib's date number (days since its 1970 epoch) of epoch seconds: no per-bar pandas conversion."""
    return seconds / 86400.0


def _coarse(intervals: Sequence[tuple[float, float]], gap: float) -> list[tuple[float, float]]:
    """Intervals closer than `gap` drawn as one (tens of thousands of steps are less than a pixel each)."""
    out: list[tuple[float, float]] = []
    for s, e in intervals:
        if out and s - out[-1][1] < gap:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def timeline(path: Path, sites: Sequence[str], windows: Mapping[str, Sequence[tuple[float, float]]],
             training: Mapping[str, Sequence[tuple[float, float]]],
             regimes: Sequence[tuple[float, float, str]], span: tuple[float, float]) -> Path:
    """Per site: its curtailment windows (light band) and the moments it trained (dark band); the regime
    of the whole federation shaded behind, on the simulated clock."""
    plt = _plt()
    import matplotlib.dates as mdates  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.8 * (len(sites) + 1)))
    pixel = (span[1] - span[0]) / 2000.0
    for start, end, regime in _coarse_regimes(regimes, pixel):
        ax.axvspan(_days(start), _days(end), color=REGIME_COLORS.get(regime, "#eeeeee"), alpha=0.55, lw=0)
    rows = list(sites)
    for i, site in enumerate(rows):
        y = len(rows) - i
        bars = [(_days(s), _days(e - s)) for s, e in _coarse(windows.get(site, []), pixel)]
        if bars:
            ax.broken_barh(bars, (y - 0.35, 0.7), facecolors=WINDOW_COLOR, edgecolors="#5aa9d6", lw=0.5)
        bars = [(_days(s), _days(e - s)) for s, e in _coarse(training.get(site, []), pixel)]
        if bars:
            ax.broken_barh(bars, (y - 0.2, 0.4), facecolors=TRAIN_COLOR, lw=0)
    ax.set_yticks(range(len(rows), 0, -1), rows)
    ax.set_ylim(0.3, len(rows) + 0.7)
    ax.xaxis_date(tz="UTC")
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
    ax.set_xlim(_days(span[0]), _days(span[1]))
    handles = [plt.Rectangle((0, 0), 1, 1, color=WINDOW_COLOR, label="curtailment window"),
               plt.Rectangle((0, 0), 1, 1, color=TRAIN_COLOR, label="training")]
    handles += [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.55, label=f"regime: {r}") for r, c in REGIME_COLORS.items()]
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=5, fontsize=8, frameon=False)
    ax.set_xlabel("simulated time (UTC)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _coarse_regimes(regimes: Sequence[tuple[float, float, str]], gap: float) -> list[tuple[float, float, str]]:
    out: list[tuple[float, float, str]] = []
    for s, e, r in regimes:
        if out and out[-1][2] == r and s - out[-1][1] < gap:
            out[-1] = (out[-1][0], max(out[-1][1], e), r)
        else:
            out.append((s, e, r))
    return out


def learning_curves(path: Path, series: Mapping[str, Any]) -> Path:
    """Loss and validation bits per byte against wall time and tokens: federated sites against the
    centralized baselines (one site's batch, and the sites' batch)."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    fed_steps = series["steps"]          # site -> {"wall_s", "tokens", "loss"}
    fed_val = series["val"]              # {"wall_s", "tokens", "val_bpb"}
    # {"wall_s", "tokens", "loss", "val_wall_s", "val_tokens", "val_bpb"} of each centralized baseline
    bases = [(series.get("baseline"), "centralized, one site's batch", CENTRAL_COLOR, "s--"),
             (series.get("baseline_sites"), "centralized, the sites' batch", SITES_BATCH_COLOR, "D:")]
    for col, axis in enumerate(("wall_s", "tokens")):
        ax = axes[0, col]
        for i, (site, s) in enumerate(sorted(fed_steps.items())):
            ax.plot(s[axis], s["loss"], ".", ms=3, color=SITE_COLORS[i % len(SITE_COLORS)],
                    label=f"federated: {site}")
        for base, label, color, _ in bases:
            if base and base["loss"]:
                ax.plot(base[axis], base["loss"], "-", lw=0.8, alpha=0.7, color=color, label=label)
        ax.set_ylabel("training loss")
        ax = axes[1, col]
        if fed_val["val_bpb"]:
            ax.plot(fed_val[axis], fed_val["val_bpb"], "o-", ms=4, color="#2ca02c", label="federated (round end)")
        for base, label, color, style in bases:
            if base and base["val_bpb"]:
                ax.plot(base["val_" + axis], base["val_bpb"], style, ms=4, color=color, label=label)
        ax.set_ylabel("validation bits per byte")
        for ax in axes[:, col]:
            ax.set_xlabel("wall time since start (s)" if axis == "wall_s" else "tokens")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle("Loss and validation bits per byte: federated vs centralized", fontsize=11, x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def energy(path: Path, summary: Mapping[str, Any]) -> Path:
    """Left: kWh per site inside and outside curtailment windows. Middle: training against curtailed time.
    Right: kg CO2 of the run against the same training at each single site."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    en = summary["energy"]
    names = list(en["sites"]) + ["total"]
    rows = [en["sites"][n] for n in en["sites"]] + [en["total"]]
    inside = [r["in_windows_kwh"] for r in rows]
    outside = [r["outside_windows_kwh"] for r in rows]
    ax = axes[0]
    ax.bar(names, inside, color="#2ca02c", label="inside windows")
    ax.bar(names, outside, bottom=inside, color="#d62728", label="outside windows")
    ax.set_ylabel("kWh")
    ax.set_title("Energy", loc="left", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    util = summary["utilisation"]
    unames = list(util["sites"])
    x = range(len(unames))
    ax.bar([i - 0.2 for i in x], [util["sites"][n]["curtailed_s"] / 3600 for n in unames], 0.4,
           color=WINDOW_COLOR, edgecolor="#5aa9d6", label="curtailed (run live)")
    ax.bar([i + 0.2 for i in x], [util["sites"][n]["train_sim_s"] / 3600 for n in unames], 0.4,
           color=TRAIN_COLOR, label="training")
    ax.set_xticks(list(x), unames)
    ax.set_ylabel("simulated hours")
    ax.set_title("Compute utilisation", loc="left", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[2]
    em = summary["emissions"]
    labels = ["this run"] + [f"only {n}" for n in em["single_site"]]
    default = [em["total"]["default_kg"]] + [b["default_kg"] for b in em["single_site"].values()]
    ax.bar([i - 0.2 for i in range(len(labels))], default, 0.4, color="#7f7f7f",
           label=f"default intensity ({em['default_intensity_kg_per_kwh']:g} kg/kWh outside windows)")
    moer = [em["total"]["moer_kg"]] + [b["moer_kg"] for b in em["single_site"].values()]
    if any(v is not None for v in moer):
        ax.bar([i + 0.2 for i in range(len(labels))], [v or 0.0 for v in moer], 0.4, color="#9467bd",
               label="scenario MOER")
    top = max([v for v in default + moer if v is not None] or [0.0])
    ax.set_ylim(0, top * 1.3 if top > 0 else 1.0)   # room for the legend above the bars
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax.set_ylabel("kg CO2")
    ax.set_title("Emissions vs single-site runs", loc="left", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
