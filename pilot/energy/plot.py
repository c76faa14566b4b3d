"""A picture of a scenario: one panel per site, generation (PV + wind) against load, and the windows.

    python -m pilot.energy.plot                                  # the shipped scenario, a week in April
    python -m pilot.energy.plot --start 2025-07-07 --days 7 --out runs/energy_july.png
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import pandas as pd

from pilot.energy import policy, scenario, sites

DEFAULT_START = "2025-04-07"
DEFAULT_OUT = Path("runs") / "energy_week.png"


def plot_window(scn: sites.Scenario, start: pd.Timestamp, days: float, out: Path) -> Path:
    import matplotlib  # noqa: PLC0415 - only for pictures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    profiles = scenario.site_profiles(scn)
    times = scenario.step_times(scn)
    end_all = times[-1] + scn.step_s
    lo, hi = start.timestamp(), (start + timedelta(days=days)).timestamp()
    fig, axes = plt.subplots(len(scn.sites), 1, figsize=(14, 2.8 * len(scn.sites)), sharex=True, squeeze=False)
    for ax, site in zip(axes[:, 0], scn.sites, strict=True):
        p = profiles[site.name]
        raw = scenario.raw_curtailed(site, scn, p)
        raw_w = policy.step_windows(times, raw, end_all)
        eff_w = policy.offline_hysteresis(raw_w, scn.min_on_s, scn.min_off_s, end_all)
        sel = (times >= lo) & (times < hi)
        x = pd.to_datetime(times[sel], unit="s", utc=True)
        if site.signal == "surplus":
            ax.stackplot(x, p["pv_w"].to_numpy()[sel] / 1e3, p["wind_w"].to_numpy()[sel] / 1e3,
                         labels=["PV", "wind"], colors=["#f2b134", "#4a90c2"], alpha=0.8)
            ax.plot(x, p["load_w"].to_numpy()[sel] / 1e3, color="black", lw=1.2, label="load")
            ax.set_ylabel("kW")
        else:
            ax.plot(x, p["moer"].to_numpy()[sel], color="black", lw=1.0, label="MOER")
            ax.axhline(float(site.options.get("threshold") or scn.threshold), color="red", lw=0.8, ls="--")
            ax.set_ylabel("lbs CO2/MWh")
        top = ax.get_ylim()[1]
        for windows, y0, color, label in ((raw_w, 0.94, "#9bd19b", "raw window"),
                                          (eff_w, 0.88, "#2e8b57", "effective window")):
            first = True
            for s, e in windows:
                if e <= lo or s >= hi:
                    continue
                span = pd.to_datetime([max(s, lo), min(e, hi)], unit="s", utc=True)
                ax.axvspan(span[0], span[1], ymin=y0, ymax=y0 + 0.05, color=color, label=label if first else None)
                first = False
        share = policy.inside_seconds(eff_w, lo, hi) / (hi - lo)
        ax.set_ylim(0, top * 1.12)
        ax.set_title(f"{site.name} ({site.region}, {site.options.get('weather', site.options.get('moer_trace'))}): "
                     f"curtailed {share:.0%} of the week", fontsize=10, loc="left")
        ax.legend(loc="center left", bbox_to_anchor=(1.005, 0.5), fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("UTC")
    fig.suptitle(f"{scn.source.name if scn.source else 'scenario'}: generation vs. load and curtailment windows, "
                 f"{start.date()} + {days:g} days (min_on {scn.min_on_s:g} s, min_off {scn.min_off_s:g} s)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pilot.energy.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default=None, help="scenario TOML (default: the shipped one)")
    parser.add_argument("--start", default=DEFAULT_START, help=f"first day, UTC (default {DEFAULT_START})")
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    scn = sites.load_scenario(args.scenario)
    start = pd.Timestamp(args.start, tz="UTC") if pd.Timestamp(args.start).tzinfo is None else pd.Timestamp(args.start)
    if not (scn.start.timestamp() <= start.timestamp() < scn.end.timestamp()):
        parser.error(f"--start {start} is outside the scenario ({scn.start} .. {scn.end})")
    print(plot_window(scn, start, args.days, Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
