"""`pilot report RUN_DIR` (python -m pilot.report): read the run's logs, summarise, draw, write the page.

    pilot report runs/demo                  # writes runs/demo/report/index.html
    pilot report RUN_DIR --out OUT_DIR --png # also a screenshot of the page (headless Chromium)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from pilot.report import figures as report_figures
from pilot.report import summary as report_summary
from pilot.report.html import render_html, render_png
from pilot.report.logs import LogError, read_run
from pilot.report.summary import DEFAULT_INTENSITY_KG_PER_KWH, REPORT_DIR, summarize


def build(run_dir: str | Path, out_dir: str | Path | None = None,
          intensity: float = DEFAULT_INTENSITY_KG_PER_KWH, scenario: str | Path | None = None) -> Path:
    """Read the logs, write summary.json, the figures and index.html into `out_dir` (RUN_DIR/report).
    `scenario`: the scenario file, for its MOER traces, when energy_config.json does not name it."""
    logs = read_run(run_dir)
    if scenario is not None and logs.energy_config is not None:
        logs.energy_config["scenario_path"] = str(scenario)
    out = Path(out_dir) if out_dir else Path(run_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    summary, drawing = summarize(logs, intensity)
    figures: dict[str, Path | None] = {"timeline": None, "learning": None, "energy": None}
    if drawing["horizon"] and drawing["horizon"][1] > drawing["horizon"][0]:
        figures["timeline"] = report_figures.timeline(out / "timeline.png", drawing["sites"], drawing["windows"],
                                                      drawing["training"], drawing["regimes"], drawing["horizon"])
    figures["learning"] = report_figures.learning_curves(out / "learning.png", drawing["series"])
    if summary["energy"]:
        figures["energy"] = report_figures.energy(out / "energy.png", summary)
    summary["figures"] = {k: (v.name if v else None) for k, v in figures.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False, default=_json_default) + "\n")
    page = out / "index.html"
    page.write_text(render_html(summary, figures), encoding="utf-8")
    return page


def _json_default(value: Any) -> Any:
    raise TypeError(f"not JSON: {value!r}")


# ------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pilot report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Method:\n" + report_summary.__doc__.split("Method (also stated on the page, `METHOD`):")[1])
    parser.add_argument("run_dir", help="the run directory (holds logs/events.jsonl, logs/steps.jsonl, ...)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    parser.add_argument("--intensity", type=float, default=DEFAULT_INTENSITY_KG_PER_KWH,
                        help="grid carbon intensity outside curtailment windows, kg CO2/kWh "
                             f"(default {DEFAULT_INTENSITY_KG_PER_KWH}: U.S. average 2023, EIA)")
    parser.add_argument("--scenario", default=None,
                        help="the run's scenario TOML, for MOER traces (default: the one energy_config.json names)")
    parser.add_argument("--png", action="store_true", help="also screenshot the page to index.png (headless Chromium)")
    args = parser.parse_args(argv)
    if not (args.intensity >= 0 and math.isfinite(args.intensity)):
        parser.error(f"--intensity must be a non-negative number, got {args.intensity}")
    try:
        page = build(args.run_dir, args.out, args.intensity, args.scenario)
    except LogError as error:
        print(f"pilot report: error: {error}", file=sys.stderr)
        return 2
    print(page)
    if args.png:
        print(render_png(page, page.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
