"""The official `watttime` client against a local HTTP server that speaks WattTime's v3 protocol
(basic-auth /login returning a token; bearer-token /v3/historical and /v3/forecast)."""

from __future__ import annotations

import base64
import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from pilot.energy import plan, traces, watttime

USER, PASSWORD, TOKEN = "pilot-user", "pilot-pass", "token-123"
PERIOD = timedelta(minutes=5)


def moer_at(when: datetime) -> float:
    """The server's MOER: a daily pattern, below 100 from 10:00 to 14:00 UTC."""
    return 60.0 + when.minute / 2 if 10 <= when.hour < 14 else 500.0 + when.hour


class FakeWattTime(BaseHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        type(self).requests.append(url.path)
        if url.path == "/login":
            expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            if self.headers.get("Authorization") != expected:
                return self.reply(403, {"error": "invalid credentials"})
            return self.reply(200, {"token": TOKEN})
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.reply(401, {"error": "invalid token"})
        meta = {"region": query.get("region"), "signal_type": query.get("signal_type"),
                "units": "lbs_co2_per_mwh", "data_point_period_seconds": 300,
                "model": {"date": "2024-10-01", "type": "binned_regression"}, "warnings": []}
        if url.path == "/v3/historical":
            start, end = datetime.fromisoformat(query["start"]), datetime.fromisoformat(query["end"])
            points, when = [], start
            while when <= end:   # inclusive, as the real API
                points.append({"point_time": when.isoformat(), "value": moer_at(when)})
                when += PERIOD
            return self.reply(200, {"data": points, "meta": meta})
        if url.path == "/v3/forecast":
            now = datetime(2025, 6, 1, 11, 5, tzinfo=UTC)
            return self.reply(200, {"data": [{"point_time": now.isoformat(), "value": moer_at(now)}],
                                    "meta": {**meta, "generated_at": now.isoformat()}})
        return self.reply(404, {"error": "not found"})


@pytest.fixture
def server(monkeypatch):
    FakeWattTime.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeWattTime)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("WATTTIME_USERNAME", USER)
    monkeypatch.setenv("WATTTIME_PASSWORD", PASSWORD)
    monkeypatch.delenv("WATTTIME_USER", raising=False)
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_history_downloads_through_the_official_client_into_a_cached_trace(server, tmp_path):
    start = datetime(2025, 6, 1, tzinfo=UTC)
    end = start + timedelta(days=40)   # longer than the client's 30-day chunks: two requests
    path = watttime.download_history("CAISO_NORTH", start, end, tmp_path, base_url=server)
    assert FakeWattTime.requests.count("/v3/historical") == 2 and "/login" in FakeWattTime.requests
    series = traces.read_moer_csv(path)["CAISO_NORTH"]
    assert series.index[0] == start and series.index[-1] == end
    assert len(series) == 40 * 288 + 1   # every 5-minute point once, chunk edges not doubled
    assert all(series.iloc[i] == moer_at(series.index[i]) for i in range(0, len(series), 97))
    # the cached file is the trace `pilot plan` reads: windows 10:00-14:00 UTC every day
    result = plan.plan_files([path], 100.0)
    windows = result["sites"]["client_0"]["windows"]
    assert len(windows) == 40 and windows[0] == ["2025-06-01T10:00:00+00:00", "2025-06-01T14:00:00+00:00"]
    # a second call is served from the cache
    FakeWattTime.requests.clear()
    assert watttime.download_history("CAISO_NORTH", start, end, tmp_path, base_url=server) == path
    assert FakeWattTime.requests == []


def test_live_polling_reads_the_nowcast(server):
    when, value = watttime.latest_moer("CAISO_NORTH", base_url=server)
    assert when == datetime(2025, 6, 1, 11, 5, tzinfo=UTC) and value == 62.5


def test_wrong_password_and_missing_credentials_are_clear(server, tmp_path, monkeypatch):
    start = datetime(2025, 6, 1, tzinfo=UTC)
    monkeypatch.setenv("WATTTIME_PASSWORD", "wrong")
    with pytest.raises(watttime.WattTimeError, match="refused the login.*WATTTIME_USERNAME"):
        watttime.download_history("CAISO_NORTH", start, start + timedelta(days=1), tmp_path, base_url=server)
    monkeypatch.delenv("WATTTIME_USERNAME")
    monkeypatch.delenv("WATTTIME_USER")   # the client's own variable, which our call filled in
    with pytest.raises(watttime.WattTimeError, match="needs credentials"):
        watttime.latest_moer("CAISO_NORTH", base_url=server)


def test_a_scenario_site_can_take_its_moer_from_watttime(server, tmp_path, monkeypatch, redis_client):
    from pilot.energy import sites
    from pilot.energy.events import EnergyEvents
    from pilot.energy.simulation import Simulation

    monkeypatch.setenv("WATTTIME_API_URL", server)
    monkeypatch.setenv("PILOT_WATTTIME_CACHE", str(tmp_path / "cache"))
    (tmp_path / "s.toml").write_text("""
[scenario]
start = "2025-06-01T00:00:00Z"
end = "2025-06-03T00:00:00Z"

[[sites]]
name = "client_0"
region = "CAISO_NORTH"
signal = "moer"
gpus = 1
gpu_train_kw = 0.7
gpu_idle_kw = 0.1
moer_trace = "watttime"
""")
    scenario = sites.load_scenario(tmp_path / "s.toml")
    Simulation(scenario, redis_client, "wt", speedup=0, log=lambda _t: None).run()
    got = [(e.curtailed, e.sim_time) for e in EnergyEvents(redis_client, "wt").history()]
    assert got == [(True, "2025-06-01T10:00:00+00:00"), (False, "2025-06-01T14:00:00+00:00"),
                   (True, "2025-06-02T10:00:00+00:00"), (False, "2025-06-02T14:00:00+00:00")]
    assert list((tmp_path / "cache").glob("CAISO_NORTH_co2_moer_*.csv"))
