"""The report page: HTML rendered from the summary (every number on it is in summary.json), and a PNG
screenshot of it in headless Chromium."""

from __future__ import annotations

import base64
import html
import math
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pilot.report.summary import DEFAULT_INTENSITY_KG_PER_KWH, INTENSITY_SOURCE, iso

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


# ------------------------------------------------------------------ the page
def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value.is_integer() and 1000 <= abs(value) < 1e15:   # token counts and the like
            return f"{int(value):,}"
        return f"{value:,.{digits}f}" if abs(value) >= 10 ** -digits else f"{value:.{digits}g}"
    return html.escape(str(value))


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


METHOD = """
<p><b>Simulated time.</b> A step that took <i>s</i> wall seconds and ended at simulated time <i>t</i> trained over
[<i>t</i> − <i>s</i>·speedup, <i>t</i>] (started where the previous step ended when the logged clock lagged, so that no step time is lost). Windows come from the curtailment transitions the server read
(logs/energy.jsonl); the run was live from each start/resume event to the last event of that server.</p>
<p><b>Wall time.</b> Federated: seconds since the server's first event (setup and start-up included);
centralized: seconds since its first step began.</p>
<p><b>Energy.</b> A site is held by the run while its window is open (and the run is live) and while it works in a
round (from receiving the round to handing in its result), also outside its window. Held time draws the site's
training power (GPUs × gpu_train_kw) while it steps and its idle power (GPUs × gpu_idle_kw) otherwise; time not held
draws nothing.</p>
<p><b>Emissions.</b> Default method: energy drawn inside a site's curtailment window is surplus renewable energy that
would otherwise be curtailed, so it counts as zero marginal emissions; energy outside windows comes from the grid at
{intensity:g} kg CO2/kWh ({source}). MOER method (sites whose scenario has a MOER trace): all energy × the trace's
marginal emission rate. A single-site run places all of this run's training GPU-hours at one site, training without
pause from the run's first training moment; under the default method its energy inside that site's logged windows
is zero and any part beyond the logged record counts as grid energy.</p>
<p><b>Utilisation.</b> Simulated seconds spent in optimizer steps / simulated seconds curtailed while the run was
live.</p>
"""

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:13px} th,td{border:1px solid #ccc;padding:3px 8px;
text-align:right} th{background:#f0f3f6} td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee} .note{background:#fff7e0;border-left:4px solid #e0a800;padding:6px 10px;
margin:4px 0;font-size:13px} .warn{background:#fdecea;border-left:4px solid #d9534f;padding:6px 10px;margin:4px 0;
font-size:13px} .small{font-size:12px;color:#555}
"""


def img(path: Path | None, alt: str) -> str:
    if path is None:
        return f'<p class="note">{html.escape(alt)}: not available (see the notes above).</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>' \
           f'<p class="small">also as <a href="{html.escape(path.name)}">{html.escape(path.name)}</a></p>'


def render_html(summary: dict[str, Any], figures: dict[str, Path | None]) -> str:
    run, sites = summary["run"], summary["sites"]
    bases = [b for b in (summary["baseline"], summary.get("baseline_sites")) if b]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Pilot run report</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Pilot run report</h1><p class='small'>{html.escape(summary['run_dir'])} · generated "
             f"{iso(summary['generated_wall_ts'])} · every number here is in summary.json</p>"]
    for note in summary["notes"]:
        parts.append(f"<div class='note'>{html.escape(note)}</div>")
    for warning in summary["warnings"]:
        parts.append(f"<div class='warn'>{html.escape(warning)}</div>")
    parts.append("<h2>Summary</h2>")

    def ratio(base: dict) -> str:
        if run["final_val_bpb"] is None or not base.get("final_val_bpb"):
            return "–"
        return f"{run['final_val_bpb'] / base['final_val_bpb']:.4f}"

    rows = [("rounds", fmt(run["rounds"]), *("–" for _ in bases)),
            ("tokens", fmt(run["tokens"]), *(fmt(b["tokens"]) for b in bases)),
            ("tokens per optimizer step", "a site's batch per site", *(fmt(b["batch_tokens"]) for b in bases)),
            ("optimizer steps (sequential)", fmt(run["steps"]) + " (all sites)", *(fmt(b["steps"]) for b in bases)),
            ("final validation bits per byte", fmt(run["final_val_bpb"], 4), *(fmt(b["final_val_bpb"], 4) for b in bases)),
            ("val bpb at the federation's tokens (tokens)", "–",
             *(f"{fmt(b['val_bpb_at_equal_tokens'], 4)} ({fmt(b['val_bpb_at_equal_tokens_tokens'])})" for b in bases)),
            ("federated val bpb / this", "–", *(ratio(b) for b in bases)),
            ("wall time (s)", fmt(run["wall_s"], 1), *(fmt(b["wall_s"], 1) for b in bases)),
            ("outcome", fmt(run["outcome"]), *("–" for _ in bases))]
    parts.append(table(("", "federated", *(b["label"] for b in bases)), rows))
    parts.append(table(("simulated clock", ""), [
        ("span", f"{iso(run['sim_start'])} → {iso(run['sim_end'])}"),
        ("speedup (simulated s per wall s)", f"{fmt(run['speedup'], 2)} ({fmt(run['speedup_source'])})"),
        ("live simulated hours", fmt(run["live_sim_s"] / 3600, 2)),
        ("server incarnations", fmt(run["incarnations"])),
        *((f"hours in regime {r}", fmt(s / 3600, 2)) for r, s in run["regime_sim_s"].items())]))
    parts.append("<h2>Curtailment timeline</h2>" + img(figures.get("timeline"), "curtailment timeline"))
    parts.append(table(("site", "windows", "curtailed h", "curtailed h (run live)", "rounds", "steps",
                        "tokens (steps)", "tokens (results)", "training wall s", "training sim h",
                        "training inside windows sim h"),
                       [(html.escape(s), fmt(v["windows"]), fmt(v["curtailed_s"] / 3600, 2),
                         fmt(v["curtailed_live_s"] / 3600, 2), fmt(v["rounds"]), fmt(v["steps"]),
                         fmt(v["tokens_stepped"]), fmt(v["tokens_results"]), fmt(v["train_wall_s"], 1),
                         fmt(v["train_sim_s"] / 3600, 2), fmt(v["train_in_windows_sim_s"] / 3600, 2))
                        for s, v in sites.items()]))
    parts.append("<h2>Loss and validation bits per byte</h2>" + img(figures.get("learning"), "learning curves"))
    parts.append("<h2>Energy, emissions and utilisation</h2>" + img(figures.get("energy"), "energy and emissions"))
    energy, em, util = summary["energy"], summary["emissions"], summary["utilisation"]
    if energy:
        parts.append("<p>Modelled power (the scenario's sites): " + "; ".join(
            f"{html.escape(n)} {fmt(r['gpus'])} GPUs x {fmt(r['gpu_train_kw'])} kW training "
            f"({fmt(r['train_kw'])} kW), x {fmt(r['gpu_idle_kw'])} kW idle ({fmt(r['idle_kw'])} kW)"
            for n, r in energy["sites"].items()) + ". Energy = that power x the simulated time held.</p>")
        parts.append(table(("site", "GPUs", "training kWh", "idle kWh", "total kWh", "inside windows kWh",
                            "outside windows kWh", "share inside", "kg CO2 (default)", "kg CO2 (MOER)"),
                           [(html.escape(n), fmt(r["gpus"]), fmt(r["train_kwh"]), fmt(r["idle_kwh"]),
                             fmt(r["energy_kwh"]), fmt(r["in_windows_kwh"]), fmt(r["outside_windows_kwh"]),
                             pct(r["share_in_windows"]), fmt(em["sites"][n]["default_kg"]),
                             fmt(em["sites"][n]["moer_kg"])) for n, r in energy["sites"].items()]
                           + [("total", "–", fmt(energy["total"]["train_kwh"]), fmt(energy["total"]["idle_kwh"]),
                               fmt(energy["total"]["energy_kwh"]), fmt(energy["total"]["in_windows_kwh"]),
                               fmt(energy["total"]["outside_windows_kwh"]), pct(energy["total"]["share_in_windows"]),
                               fmt(em["total"]["default_kg"]), fmt(em["total"]["moer_kg"]))]))
        parts.append(f"<p>Training GPU-hours of the run: {fmt(energy['total']['train_gpu_hours'])}.</p>")
        parts.append(table(("same training at one site", "hours", "kWh", "inside windows kWh",
                            "hours beyond the logged record", "kg CO2 (default)", "kg CO2 (MOER)",
                            "this run / single site (default)"),
                           [(f"only {html.escape(n)}", fmt(b["hours"], 2), fmt(b["energy_kwh"]),
                             fmt(b["in_windows_kwh"]), fmt(b["beyond_record_hours"], 2), fmt(b["default_kg"]),
                             fmt(b["moer_kg"]), pct(b["run_over_single_default"]))
                            for n, b in em["single_site"].items()]))
    parts.append(table(("site", "curtailed sim h (run live)", "training sim h", "utilisation"),
                       [(html.escape(n), fmt(u["curtailed_s"] / 3600, 2), fmt(u["train_sim_s"] / 3600, 2),
                         pct(u["utilisation"])) for n, u in util["sites"].items()]
                       + [("total", fmt(util["total"]["curtailed_s"] / 3600, 2),
                           fmt(util["total"]["train_sim_s"] / 3600, 2), pct(util["total"]["utilisation"]))]))
    intensity = em["default_intensity_kg_per_kwh"] if em else DEFAULT_INTENSITY_KG_PER_KWH
    parts.append("<h2>Method</h2>" + METHOD.format(intensity=intensity, source=html.escape(INTENSITY_SOURCE)))
    parts.append("<h2>Inputs</h2>" + table(("file", "records"), [(html.escape(k), fmt(v))
                                                                 for k, v in summary["inputs"].items()]))
    parts.append("</body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------ screenshots
def chromium_binary() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(f"no headless browser found (looked for {', '.join(CHROMIUM_NAMES)} on PATH); "
                            "install Debian's chromium (system-packages.txt)")


def _chromium(html_path: Path, mode: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Headless Chromium on a local page (a fresh profile, no network chatter), in `mode` (a screenshot, the DOM)."""
    with tempfile.TemporaryDirectory(prefix="pilot-chromium-") as profile:
        cmd = [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", *mode, html_path.as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)


def render_png(html_path: str | Path, png_path: str | Path, width: int = 1200, height: int = 3000,
               timeout_s: float = 90.0) -> Path:
    """A screenshot of a local HTML page by headless Chromium."""
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    done = _chromium(html_path, [f"--screenshot={png_path}", f"--window-size={width},{height}"], timeout_s)
    if done.returncode != 0 or not png_path.is_file():
        raise RuntimeError(f"chromium could not render {html_path} (exit {done.returncode}): {done.stderr[-800:]}")
    return png_path


def rendered_dom(html_path: str | Path, timeout_s: float = 90.0) -> str:
    """The page's DOM as headless Chromium built it (what a reader's browser shows, as HTML)."""
    html_path = Path(html_path).resolve()
    done = _chromium(html_path, ["--dump-dom"], timeout_s)
    if done.returncode != 0 or "<body" not in done.stdout:
        raise RuntimeError(f"chromium could not load {html_path} (exit {done.returncode}): {done.stderr[-800:]}")
    return done.stdout


