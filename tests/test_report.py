"""`pilot report` on a run directory written by hand to the run-log contract (three sites, windows that open
and close, rounds, a spill past a window's close, a centralized baseline, a MOER site): the numbers of
summary.json against the same quantities counted here from what was written, the page rendered by headless
Chromium, and bad or missing inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pilot.energy.accounting import KG_PER_LB
from pilot.report import cli as report_cli
from pilot.report import html as report_html
from pilot.report import spans
from pilot.report import summary as report_summary
from pilot.report.logs import LogError, read_run

H = 3600.0
S0 = 1743984000.0            # 2025-04-07T00:00:00Z, the simulated start
W0 = 1_790_000_000.0         # wall-clock start
SPEEDUP = 60.0               # simulated s per wall s
STEP_SIM = 120.0             # one optimizer step: 2 wall s
END = 8 * H                  # the run ends 8 simulated hours in
SITES = {"client_0": {"region": "US-NC-GREENSBORO", "signal": "surplus", "gpus": 4, "gpu_train_kw": 0.7,
                      "gpu_idle_kw": 0.1},
         "client_1": {"region": "US-AK-SAND-POINT", "signal": "surplus", "gpus": 2, "gpu_train_kw": 0.5,
                      "gpu_idle_kw": 0.05},
         "client_2": {"region": "CAISO_NORTH", "signal": "moer", "gpus": 4, "gpu_train_kw": 0.7,
                      "gpu_idle_kw": 0.1}}
# windows in simulated hours from S0; client_1 was already curtailed when the record starts (its first
# transition is a close), client_0 is still curtailed when the run ends
WINDOWS = {"client_0": [(0.0, 3.0), (5.0, 8.0)], "client_1": [(0.0, 2.0), (4.0, 6.0)], "client_2": [(1.0, 2.5)]}
MOER_CAISO = 300.0           # lbs CO2/MWh, constant, for the MOER site's trace


def wall(sim_offset: float) -> float:
    return W0 + sim_offset / SPEEDUP


def curtailed(site: str, t: float) -> bool:
    return any(s * H <= t < e * H for s, e in WINDOWS[site])


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def make_run(root: Path) -> tuple[Path, dict]:
    """A run directory as the federated server writes it, and what was put into it (the truth)."""
    run = root / "run"
    events: list[dict] = []
    steps: list[dict] = []
    truth = {s: {"steps": 0, "tokens": 0, "train_outside_s": 0.0, "idle_outside_s": 0.0} for s in SITES}

    def event(kind: str, t: float, **fields) -> None:
        events.append({"kind": kind, "wall_ts": wall(t), "sim_ts": S0 + t, **fields})

    energy = [{"site": "client_0", "curtailed": 1, "sim_ts": S0 + 0.0, "value": 1200.0},
              {"site": "client_2", "curtailed": 1, "sim_ts": S0 + 1 * H, "value": 80.0},
              {"site": "client_1", "curtailed": 0, "sim_ts": S0 + 2 * H, "value": -50.0},
              {"site": "client_2", "curtailed": 0, "sim_ts": S0 + 2.5 * H, "value": 120.0},
              {"site": "client_0", "curtailed": 0, "sim_ts": S0 + 3 * H, "value": -10.0},
              {"site": "client_1", "curtailed": 1, "sim_ts": S0 + 4 * H, "value": 300.0},
              {"site": "client_0", "curtailed": 1, "sim_ts": S0 + 5 * H, "value": 90.0},
              {"site": "client_1", "curtailed": 0, "sim_ts": S0 + 6 * H, "value": -20.0}]
    event("setup", 0.0, detail="3 sites")
    event("start", 0.0, detail=f"new run in {run}")
    event("sites", 0.0, connected=sorted(SITES))
    bounds = [0.0, 1 * H, 2 * H, 2.5 * H, 3 * H, 4 * H, 5 * H, 6 * H, END]
    total_tokens, number, val = 0, 0, 3.0
    for rs, re in zip(bounds, bounds[1:], strict=False):
        for e in energy:   # the transitions at this instant, as the server logs them
            if e["sim_ts"] - S0 == rs:
                event("energy", rs, site=e["site"], curtailed=e["curtailed"], event_sim_ts=e["sim_ts"])
        training = [s for s in SITES if curtailed(s, rs)]
        regime = "paused" if not training else "solo" if len(training) == 1 else "federated"
        event("regime", rs, regime=regime, sites=training)
        if not training:
            continue
        number += 1
        event("round-start", rs, round=number, regime=regime, sites=training)
        round_tokens, losses = 0, {}
        for site in training:
            tokens_per_step = 512 * SITES[site]["gpus"]
            t, site_tokens, n = rs + 60.0, 0, 0
            closes = re < END and not curtailed(site, re)   # its window closes at the round's end
            while t + STEP_SIM <= re or (closes and t < re):   # a closing window: the last step spills over
                t += STEP_SIM
                n += 1
                loss = 6.0 - 0.002 * (truth[site]["steps"] + n)
                steps.append({"site": site, "round": number, "step": truth[site]["steps"] + n, "loss": loss,
                              "tokens": tokens_per_step, "seconds": STEP_SIM / SPEEDUP, "wall_ts": wall(t),
                              "sim_ts": S0 + t})
                site_tokens += tokens_per_step
            sim_end = t + 30.0 if closes else re
            if closes:
                truth[site]["train_outside_s"] += t - re
                truth[site]["idle_outside_s"] += sim_end - max(t, re)
            truth[site]["steps"] += n
            truth[site]["tokens"] += site_tokens
            round_tokens += site_tokens
            losses[site] = loss
            events.append({"kind": "site-result", "wall_ts": wall(sim_end), "sim_ts": S0 + sim_end, "round": number,
                           "site": site, "status": "ok", "reason": "deadline", "tokens": site_tokens, "steps": n,
                           "loss": loss, "seconds_training": n * STEP_SIM / SPEEDUP,
                           "seconds_total": (sim_end - rs) / SPEEDUP, "wall_start": wall(rs), "wall_end": wall(sim_end),
                           "sim_start": S0 + rs, "sim_end": S0 + sim_end})
        total_tokens += round_tokens
        val -= 0.1
        event("round-end", re, round=number, regime=regime, sites=training, tokens=round_tokens,
              total_tokens=total_tokens, val_bpb=val, loss=losses, busy={s: 0.9 for s in training},
              training_s={s: 1.0 for s in training})
    event("finished", END, outcome="max-rounds", round=number, tokens=total_tokens)
    # the order a server writes: by wall time (results and steps arrive as they happen)
    events.sort(key=lambda e: e["wall_ts"])
    write_jsonl(run / "logs" / "events.jsonl", events)
    write_jsonl(run / "logs" / "steps.jsonl", sorted(steps, key=lambda s: s["wall_ts"]))
    write_jsonl(run / "logs" / "energy.jsonl", energy)
    # a scenario file with a MOER trace for client_2's region, so the MOER method has something to integrate
    trace = root / "moer.csv"
    stamps = [f"2025-04-0{d}T{h:02d}:00:00+00:00" for d in (6, 7, 8) for h in range(24)]
    trace.write_text("timestamp,CAISO_NORTH\n" + "".join(f"{s},{MOER_CAISO}\n" for s in stamps))
    toml = ['[scenario]\nstart = "2025-04-06T00:00:00Z"\nend = "2025-04-09T00:00:00Z"\nstep_s = 300\n']
    for name, s in SITES.items():
        extra = (f'moer_trace = "{trace.name}"\n' if s["signal"] == "moer"
                 else 'weather = "723170TYA.CSV"\nload_base_kw = 100.0\n')
        toml.append(f'[[sites]]\nname = "{name}"\nregion = "{s["region"]}"\nsignal = "{s["signal"]}"\n'
                    f'gpus = {s["gpus"]}\ngpu_train_kw = {s["gpu_train_kw"]}\ngpu_idle_kw = {s["gpu_idle_kw"]}\n{extra}')
    (root / "scenario.toml").write_text("\n".join(toml))
    config = {"scenario": {"start": "2025-04-06T00:00:00+00:00", "end": "2025-04-09T00:00:00+00:00", "step_s": 300,
                           "threshold": 100.0, "min_on_s": 0, "min_off_s": 600, "fingerprint": "x"},
              "sites": [{"name": n, **s} for n, s in SITES.items()], "speedup": SPEEDUP,
              "scenario_path": str(root / "scenario.toml")}
    (run / "logs" / "energy_config.json").write_text(json.dumps(config))
    # base_train's metrics: one site's batch, and the sites' batch (half the steps of twice the tokens)
    write_jsonl(run / "baseline" / "metrics.jsonl", base_train_rows(200, 4096, 1.5, 0.01, lambda step: 3.0 - step / 200))
    write_jsonl(run / "baseline-sites" / "metrics.jsonl",
                base_train_rows(100, 8192, 2.5, 0.015, lambda step: 3.0 - step / 80))
    truth["total_tokens"] = total_tokens
    truth["rounds"] = number
    truth["final_val"] = val
    return run, truth


def base_train_rows(steps: int, batch: int, dt: float, slope: float, val_bpb) -> list[dict]:
    """scripts.base_train's metrics.jsonl: a row a step, val_bpb(step) at every quarter of the steps."""
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 6.0 - slope * step, "lrm": 1.0, "tokens": step * batch, "dt": dt,
               "wall_ts": W0 + 1000 + dt * step}
        if step % (steps // 4) == 0:
            row["val_bpb"] = val_bpb(step)
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    run, truth = make_run(tmp_path_factory.mktemp("report"))
    assert report_cli.main([str(run)]) == 0
    summary = json.loads((run / "report" / "summary.json").read_text())
    return run, truth, summary


def overlap_h(windows: list[tuple[float, float]], start_h: float, end_h: float) -> float:
    return sum(max(0.0, min(e, end_h) - max(s, start_h)) for s, e in windows)


def test_summary_numbers_match_the_logs(built):
    run, truth, summary = built
    steps = [json.loads(line) for line in (run / "logs" / "steps.jsonl").read_text().splitlines()]
    r = summary["run"]
    assert r["rounds"] == truth["rounds"] == 7               # the paused hour has no round
    assert r["tokens"] == truth["total_tokens"] == sum(s["tokens"] for s in steps) == r["tokens_stepped"]
    assert r["steps"] == len(steps)
    assert r["final_val_bpb"] == pytest.approx(truth["final_val"])
    assert r["outcome"] == "max-rounds"
    assert r["wall_s"] == pytest.approx(END / SPEEDUP)
    assert r["speedup"] == SPEEDUP and r["live_sim_s"] == pytest.approx(END)
    # regimes: 0-1 fed (c0,c1), 1-2.5 fed, 2.5-3 solo, 3-4 paused, 4-5 solo, 5-6 fed, 6-8 solo
    assert r["regime_sim_s"] == pytest.approx({"federated": 3.5 * H, "solo": 3.5 * H, "paused": 1 * H})
    b = summary["baseline"]
    assert b["steps"] == 200 and b["tokens"] == 200 * 4096 and b["final_val_bpb"] == pytest.approx(2.0)
    # the federated run has ~tokens; the baseline's val point nearest to it
    nearest = min((50, 100, 150, 200), key=lambda s: abs(s * 4096 - truth["total_tokens"]))
    assert b["val_bpb_at_equal_tokens"] == pytest.approx(3.0 - nearest / 200)
    assert b["batch_tokens"] == 4096 and b["label"] == "centralized, one site's batch"
    k = summary["baseline_sites"]
    assert (k["steps"], k["tokens"], k["batch_tokens"]) == (100, 100 * 8192, 8192)
    assert k["final_val_bpb"] == pytest.approx(3.0 - 100 / 80) and k["label"] == "centralized, the sites' batch"
    # the note says how to read the gaps, with the federated run's figure against each baseline
    note = next(n for n in summary["notes"] if n.startswith("Both baselines"))
    for base in (b, k):
        assert f"{100 * (r['final_val_bpb'] / base['final_val_bpb'] - 1):+.1f}%" in note
    assert "fewer sequential steps, not of federation" in note
    for site, t in ((s, truth[s]) for s in SITES):
        row = summary["sites"][site]
        assert row["steps"] == t["steps"] > 0
        assert row["tokens_stepped"] == row["tokens_results"] == t["tokens"]
        assert row["train_wall_s"] == pytest.approx(t["steps"] * STEP_SIM / SPEEDUP)
        assert row["train_sim_s"] == pytest.approx(row["train_wall_s"] * SPEEDUP)
        curtailed_h = overlap_h(WINDOWS[site], 0.0, END / H)
        assert row["curtailed_live_s"] == pytest.approx(curtailed_h * H)
        assert row["windows"] == len(WINDOWS[site])
        u = summary["utilisation"]["sites"][site]
        assert u["utilisation"] == pytest.approx(row["train_sim_s"] / (curtailed_h * H))
    # spills: the last step of a closing window ends after the close (client_0 at 3 h, client_1 at 2 h and 6 h,
    # client_2 at 2.5 h), so some training lies outside windows
    assert all(truth[s]["train_outside_s"] > 0 for s in SITES)
    assert summary["utilisation"]["total"]["curtailed_s"] == pytest.approx(11.5 * H)


def test_energy_and_emissions_match_the_logs(built):
    _, truth, summary = built
    en, em = summary["energy"], summary["emissions"]
    intensity = report_summary.DEFAULT_INTENSITY_KG_PER_KWH
    total_out = 0.0
    train_gpu_h = 0.0
    for site, cfg in SITES.items():
        t = truth[site]
        train_kw, idle_kw = cfg["gpus"] * cfg["gpu_train_kw"], cfg["gpus"] * cfg["gpu_idle_kw"]
        train_s = t["steps"] * STEP_SIM
        curtailed_s = overlap_h(WINDOWS[site], 0.0, END / H) * H
        # held: every open window of the live run, plus the spills past a close (the last step, the hand-in)
        held_s = curtailed_s + t["train_outside_s"] + t["idle_outside_s"]
        idle_s = held_s - train_s
        row = en["sites"][site]
        assert row["train_kwh"] == pytest.approx(train_kw * train_s / H)
        assert row["idle_kwh"] == pytest.approx(idle_kw * idle_s / H)
        outside = (train_kw * t["train_outside_s"] + idle_kw * t["idle_outside_s"]) / H
        assert row["outside_windows_kwh"] == pytest.approx(outside)
        assert row["in_windows_kwh"] == pytest.approx(row["energy_kwh"] - outside)
        assert em["sites"][site]["default_kg"] == pytest.approx(outside * intensity)
        total_out += outside
        train_gpu_h += cfg["gpus"] * train_s / H
    assert en["total"]["outside_windows_kwh"] == pytest.approx(total_out)
    assert em["total"]["default_kg"] == pytest.approx(total_out * intensity)
    assert en["total"]["train_gpu_hours"] == pytest.approx(train_gpu_h)
    # the MOER site: every kWh at the trace's constant rate; the others have no trace
    assert em["sites"]["client_2"]["moer_kg"] == pytest.approx(en["sites"]["client_2"]["energy_kwh"] * MOER_CAISO
                                                               / 1000 * KG_PER_LB)
    assert em["sites"]["client_0"]["moer_kg"] is None and em["total"]["moer_kg"] is None
    # single-site runs: all training GPU-hours at one site from the first step (60 s in), without pause
    first_h = 60.0 / H
    for site, cfg in SITES.items():
        single = em["single_site"][site]
        hours = train_gpu_h / cfg["gpus"]
        kwh = hours * cfg["gpus"] * cfg["gpu_train_kw"]
        inside_kwh = cfg["gpus"] * cfg["gpu_train_kw"] * overlap_h(WINDOWS[site], first_h, first_h + hours)
        assert single["hours"] == pytest.approx(hours) and single["energy_kwh"] == pytest.approx(kwh)
        assert single["default_kg"] == pytest.approx((kwh - inside_kwh) * intensity)
        assert single["beyond_record_hours"] == pytest.approx(max(0.0, first_h + hours - END / H))
        # this run draws (almost) only curtailed energy: far below any single site
        assert em["total"]["default_kg"] < 0.25 * single["default_kg"]
    assert em["single_site"]["client_2"]["moer_kg"] == pytest.approx(
        train_gpu_h * 0.7 * MOER_CAISO / 1000 * KG_PER_LB)


def test_page_is_self_contained_and_renders(built, tmp_path):
    run, _, summary = built
    page = run / "report" / "index.html"
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 3
    for name in ("timeline.png", "learning.png", "energy.png"):
        assert (run / "report" / name).stat().st_size > 10_000 and summary["figures"]
    assert "<script" not in text and "http://" not in text and "https://" not in text
    assert "0.367 kg CO2/kWh" in text and "zero marginal emissions" in text
    # the page shows the summary's numbers
    assert f"{int(summary['run']['tokens']):,}" in text
    # as a browser builds it: the summary table compares federated with both baselines, labelled, with ratios
    dom = report_html.rendered_dom(page)
    header = dom[dom.index("<h2>Summary</h2>"):].split("</thead>")[0]
    assert ["federated", "centralized, one site's batch", "centralized, the sites' batch"] == \
        [h.split("</th>")[0].replace("&#x27;", "'") for h in header.split("<th>")[2:]], header
    assert "tokens per optimizer step" in dom and "federated val bpb / this" in dom
    for base in (summary["baseline"], summary["baseline_sites"]):
        assert f"{summary['run']['final_val_bpb'] / base['final_val_bpb']:.4f}" in dom
    png = report_html.render_png(page, tmp_path / "page.png")
    from PIL import Image  # noqa: PLC0415 - matplotlib's dependency

    pixels = np.asarray(Image.open(png).convert("RGB"))
    assert pixels.shape[1] == 1200 and pixels.shape[0] >= 2000
    non_white = np.any(pixels < 245, axis=2)
    colours = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert non_white.mean() > 0.05, f"page looks blank: {non_white.mean():.3f} non-white"
    assert len(colours) > 200, f"only {len(colours)} colours: figures not drawn?"
    # the figures are in the upper part of the page, not just text: blue training bars and green windows
    assert np.sum(np.all(np.abs(pixels.astype(int) - [0x1F, 0x5F, 0x99]) < 12, axis=2)) > 500


def test_malformed_line_names_file_and_line(tmp_path, capsys):
    run, _ = make_run(tmp_path)
    path = run / "logs" / "steps.jsonl"
    lines = path.read_text().splitlines()
    lines[4] = lines[4][:-10]                       # a broken object in the middle: an error
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LogError, match=r"steps\.jsonl:5: not valid JSON"):
        report_cli.build(run)
    assert report_cli.main([str(run)]) == 2
    assert "steps.jsonl:5" in capsys.readouterr().err
    lines[4] = json.dumps({"site": "client_0", "loss": 1.0})   # valid JSON, fields missing
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LogError, match=r"steps\.jsonl:5: missing field\(s\) \['tokens', 'seconds', 'wall_ts'\]"):
        report_cli.build(run)
    events = run / "logs" / "events.jsonl"
    ev = events.read_text().splitlines()
    bad = next(i for i, line in enumerate(ev) if '"site-result"' in line)
    record = json.loads(ev[bad])
    record["sim_end"] = "soon"
    ev[bad] = json.dumps(record)
    events.write_text("\n".join(ev) + "\n")
    path.write_text("\n".join(lines[:4] + lines[5:]) + "\n")
    with pytest.raises(LogError, match=rf"events\.jsonl:{bad + 1}: sim_end must be a number"):
        report_cli.build(run)
    events.write_text("\n".join(ev[:bad] + ev[bad + 1:]) + "\n")
    energy = run / "logs" / "energy.jsonl"
    en = energy.read_text().splitlines()
    en[2] = en[2].replace('"curtailed": 0', '"curtailed": "no"')
    energy.write_text("\n".join(en) + "\n")
    with pytest.raises(LogError, match=r"energy\.jsonl:3: expected curtailed 0 or 1"):
        report_cli.build(run)


def test_cut_short_last_line_is_a_warning_not_an_error(tmp_path):
    run, truth = make_run(tmp_path)
    path = run / "logs" / "steps.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines) + "\n" + lines[-1][:25])    # a writer killed mid-line
    page = report_cli.build(run)
    summary = json.loads((page.parent / "summary.json").read_text())
    assert summary["warnings"] == [f"{path}:{len(lines) + 1}: last line cut short (writer stopped mid-line), skipped"]
    assert summary["run"]["steps"] == len(lines)
    assert f"steps.jsonl:{len(lines) + 1}" in page.read_text()


def test_missing_optional_inputs_give_a_page_that_says_so(tmp_path):
    run, truth = make_run(tmp_path)
    shutil.rmtree(run / "baseline")
    shutil.rmtree(run / "baseline-sites")
    (run / "logs" / "energy.jsonl").unlink()
    (run / "logs" / "energy_config.json").unlink()
    page = report_cli.build(run, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["baseline"] is None and summary["baseline_sites"] is None and summary["energy"] is None and summary["emissions"] is None
    text = page.read_text()
    assert "no centralized baseline" in text and "no energy transitions" in text and "no energy configuration" in text
    assert summary["run"]["tokens"] == truth["total_tokens"]
    # the speedup now comes from the server's own clock readings (simulated over wall seconds)
    assert summary["run"]["speedup"] == pytest.approx(SPEEDUP)
    assert summary["figures"]["energy"] is None and summary["figures"]["learning"] == "learning.png"
    # without any log there is nothing to report
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LogError, match="not a run directory"):
        report_cli.build(empty)


def test_interval_arithmetic_against_a_grid():
    rng = np.random.default_rng(7)
    grid = np.arange(0, 220) + 0.5

    def random_intervals() -> list[tuple[float, float]]:
        starts = np.sort(rng.integers(0, 190, size=rng.integers(0, 12)))
        return spans.union((float(s), float(s + rng.integers(1, 15))) for s in starts)

    def mask(intervals) -> np.ndarray:
        return np.any([(grid >= s) & (grid < e) for s, e in intervals] or [np.zeros_like(grid, bool)], axis=0)

    for _ in range(200):
        a, b = random_intervals(), random_intervals()
        for got, want in ((spans.intersect(a, b), mask(a) & mask(b)), (spans.subtract(a, b), mask(a) & ~mask(b)),
                          (spans.union(a + b), mask(a) | mask(b))):
            assert np.array_equal(mask(got), want)
            assert spans.length(got) == want.sum()
            assert all(e1 < s2 for (_, e1), (s2, _) in zip(got, got[1:], strict=False))   # disjoint, not touching


def test_live_time_excludes_a_server_outage(tmp_path):
    """A resumed server: curtailed time while no server ran is not counted against utilisation."""
    run = tmp_path / "run"
    ev = [{"kind": "setup", "wall_ts": 0.0, "sim_ts": 0.0}, {"kind": "start", "wall_ts": 0.1, "sim_ts": 6.0},
          {"kind": "regime", "wall_ts": 1.0, "sim_ts": 60.0, "regime": "solo", "sites": ["a"]},
          {"kind": "round-end", "wall_ts": 10.0, "sim_ts": 600.0, "round": 1, "total_tokens": 10, "val_bpb": None},
          {"kind": "setup", "wall_ts": 29.0, "sim_ts": 1740.0}, {"kind": "resume", "wall_ts": 30.0, "sim_ts": 1800.0},
          {"kind": "finished", "wall_ts": 40.0, "sim_ts": 2400.0, "outcome": "stopped"}]
    write_jsonl(run / "logs" / "events.jsonl", ev)
    write_jsonl(run / "logs" / "steps.jsonl", [{"site": "a", "loss": 5.0, "tokens": 10, "seconds": 5.0,
                                                "wall_ts": 6.0, "sim_ts": 360.0}])
    write_jsonl(run / "logs" / "energy.jsonl", [{"site": "a", "curtailed": 1, "sim_ts": 0.0, "value": 1.0}])
    report_cli.build(run)
    summary = json.loads((run / "report" / "summary.json").read_text())
    # live: 0-600 s (setup to the first server's last event) and 1740-2400 s (the second's setup to its end)
    assert summary["run"]["incarnations"] == 2 and summary["run"]["live_sim_s"] == pytest.approx(1260.0)
    assert summary["sites"]["a"]["curtailed_s"] == pytest.approx(2400.0)
    assert summary["sites"]["a"]["curtailed_live_s"] == pytest.approx(1260.0)
    assert summary["run"]["speedup"] == pytest.approx(60.0)   # no energy config: the server's clock readings
    assert summary["sites"]["a"]["train_sim_s"] == pytest.approx(300.0)
    assert summary["utilisation"]["sites"]["a"]["utilisation"] == pytest.approx(300.0 / 1260.0)
    assert summary["run"]["regime_sim_s"]["solo"] == pytest.approx(540.0)   # until the first server's last event


def test_a_step_delivered_twice_counts_once(tmp_path):
    run, truth = make_run(tmp_path)
    path = run / "logs" / "steps.jsonl"
    lines = path.read_text().splitlines()
    redone = json.loads(lines[3]) | {"wall_ts": json.loads(lines[-1])["wall_ts"] + 5, "sim_ts": S0 + END + 300}
    path.write_text("\n".join(lines + [lines[3], lines[7], json.dumps(redone)]) + "\n")
    summary, _ = report_summary.summarize(read_run(run))   # the numbers alone, no figures
    assert summary["run"]["steps"] == len(lines) + 1      # the exact repeats dropped, the redone step kept
    assert summary["warnings"] == [f"{path}: 2 repeated step record(s) ignored (lines {len(lines) + 1}, "
                                   f"{len(lines) + 2})"]


def test_moer_traces_from_a_scenario_given_on_the_command_line(tmp_path):
    run, _ = make_run(tmp_path)
    config_path = run / "logs" / "energy_config.json"
    config = json.loads(config_path.read_text())
    scenario = config.pop("scenario_path")
    config_path.write_text(json.dumps(config))
    summary, _ = report_summary.summarize(read_run(run))
    assert summary["emissions"]["moer_regions"] == [] and "give it with --scenario" in " ".join(summary["notes"])
    assert report_cli.main([str(run), "--scenario", scenario]) == 0
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["emissions"]["moer_regions"] == ["CAISO_NORTH"]
    assert summary["emissions"]["sites"]["client_2"]["moer_kg"] == pytest.approx(
        summary["energy"]["sites"]["client_2"]["energy_kwh"] * MOER_CAISO / 1000 * KG_PER_LB)


def test_events_before_the_simulation_clock_start_at_the_scenario_start(tmp_path):
    """The demo starts the server first: it waits, paused, with no simulated clock yet (sim_ts null)."""
    run = tmp_path / "run"
    ev = [{"kind": "setup", "wall_ts": 0.0, "sim_ts": None}, {"kind": "start", "wall_ts": 0.1, "sim_ts": None},
          {"kind": "regime", "wall_ts": 5.0, "sim_ts": None, "regime": "paused", "sites": []},
          {"kind": "regime", "wall_ts": 20.0, "sim_ts": S0 + 900.0, "regime": "solo", "sites": ["a"]},
          {"kind": "finished", "wall_ts": 30.0, "sim_ts": S0 + 1500.0, "outcome": "energy simulation finished"}]
    write_jsonl(run / "logs" / "events.jsonl", ev)
    write_jsonl(run / "logs" / "steps.jsonl", [{"site": "a", "loss": 5.0, "tokens": 10, "seconds": 5.0,
                                                "wall_ts": 26.0, "sim_ts": S0 + 1200.0}])
    write_jsonl(run / "logs" / "energy.jsonl", [{"site": "a", "curtailed": 1, "sim_ts": S0 + 840.0, "value": 1.0}])
    (run / "logs" / "energy_config.json").write_text(json.dumps(
        {"scenario": {"start": "2025-04-07T00:00:00+00:00"}, "speedup": 60.0,
         "sites": [{"name": "a", "region": "R", "signal": "surplus", "gpus": 2, "gpu_train_kw": 0.5,
                    "gpu_idle_kw": 0.1}]}))
    summary, drawing = report_summary.summarize(read_run(run))
    assert summary["run"]["sim_start"] == S0 and summary["run"]["live_sim_s"] == pytest.approx(1500.0)
    assert summary["run"]["regime_sim_s"] == pytest.approx({"paused": 900.0, "solo": 600.0, "federated": 0.0})
    assert "placed at the scenario's start" in summary["notes"][0]
    assert summary["sites"]["a"]["curtailed_live_s"] == pytest.approx(660.0)
    # 300 s training at 1 kW, the other 360 s of the open window idle at 0.2 kW
    assert summary["energy"]["sites"]["a"]["train_kwh"] == pytest.approx(300 / 3600)
    assert summary["energy"]["sites"]["a"]["idle_kwh"] == pytest.approx(0.2 * 360 / 3600)


def test_the_page_states_the_modelled_power_and_why_regimes_trail_the_windows(built):
    """Every kWh has its power on the page (GPUs x kW per GPU, from the scenario), and the regime shading's lag
    behind the windows is measured from the logs and said in a note."""
    run, _, summary = built
    page = (run / "report" / "index.html").read_text()
    for site, cfg in SITES.items():
        row = summary["energy"]["sites"][site]
        assert row["train_kw"] == pytest.approx(cfg["gpus"] * cfg["gpu_train_kw"])
        assert row["idle_kw"] == pytest.approx(cfg["gpus"] * cfg["gpu_idle_kw"])
        assert f"{site} {cfg['gpus']} GPUs x {cfg['gpu_train_kw']:.3f} kW training" in page
    events = [json.loads(line) for line in (run / "logs" / "events.jsonl").read_text().splitlines()]
    energy = sorted(json.loads(line)["sim_ts"] for line in (run / "logs" / "energy.jsonl").read_text().splitlines())
    lags = sorted(e["sim_ts"] - max(t for t in energy if t <= e["sim_ts"]) for e in events
                  if e["kind"] == "regime" and any(t <= e["sim_ts"] for t in energy))
    assert summary["run"]["regime_lag_sim_s"]["median"] == pytest.approx(lags[len(lags) // 2])
    assert any("the regime shading is the server's own log" in note for note in summary["notes"])
