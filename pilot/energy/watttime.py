"""MOER from WattTime through its official client (the `watttime` package, API v3).

Credentials come from the environment: WATTTIME_USERNAME (or the client's own WATTTIME_USER) and
WATTTIME_PASSWORD. The API's address is the client's `url_base` (https://api.watttime.org, or
$WATTTIME_API_URL); `base_url=` here overrides it per call, which is how tests point the client at a local
server that speaks the same protocol. Downloads are cached in runs/watttime/ ($PILOT_WATTTIME_CACHE).
A scenario site with `moer_trace = "watttime"` downloads its span this way (scenario.py).

    path = download_history("CAISO_NORTH", start, end, cache_dir)   # long CSV, reused when cached
    when, moer = latest_moer("CAISO_NORTH")                          # live polling (the nowcast)

    python -m pilot.energy.watttime history --region CAISO_NORTH --start 2025-01-01T00:00Z --end 2025-02-01T00:00Z
    python -m pilot.energy.watttime now --region CAISO_NORTH
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd

from pilot.energy import traces

USERNAME_ENVS = ("WATTTIME_USERNAME", "WATTTIME_USER")
PASSWORD_ENV = "WATTTIME_PASSWORD"
URL_ENV = "WATTTIME_API_URL"   # the client's own variable for the API's address
SIGNAL_TYPE = "co2_moer"
CACHE_ENV = "PILOT_WATTTIME_CACHE"   # where downloads are cached; default runs/watttime


class WattTimeError(RuntimeError):
    """WattTime could not be used: no credentials, refused login, or a failed request."""


def credentials() -> tuple[str, str]:
    user = next((os.environ[name] for name in USERNAME_ENVS if os.environ.get(name)), "")
    password = os.environ.get(PASSWORD_ENV, "")
    if not user or not password:
        raise WattTimeError(f"WattTime needs credentials: set {USERNAME_ENVS[0]} and {PASSWORD_ENV} "
                            "(register at https://watttime.org; the free plan covers CAISO_NORTH)")
    return user, password


def _client(kind: str, base_url: str | None):
    import watttime  # noqa: PLC0415 - the client configures logging at import

    user, password = credentials()
    # the client reads its credentials from WATTTIME_USER/WATTTIME_PASSWORD at every (re-)login
    os.environ["WATTTIME_USER"], os.environ[PASSWORD_ENV] = user, password
    client = getattr(watttime, kind)()
    base_url = base_url or os.environ.get(URL_ENV)   # read now: the client reads it only at its import
    if base_url:
        client.url_base = base_url.rstrip("/")
    return client


def _fail(what: str, error: Exception) -> WattTimeError:
    text = str(error)
    if "401" in text or "403" in text:
        return WattTimeError(f"WattTime refused the login for {what}: check {USERNAME_ENVS[0]} and "
                             f"{PASSWORD_ENV} ({text.splitlines()[0]})")
    return WattTimeError(f"WattTime request for {what} failed: {text.splitlines()[0] if text else error!r}")


def cache_path(cache_dir: str | Path, region: str, start: datetime, end: datetime) -> Path:
    stamp = "%Y%m%dT%H%MZ"
    s, e = pd.Timestamp(start).tz_convert("UTC"), pd.Timestamp(end).tz_convert("UTC")
    return Path(cache_dir) / f"{region}_{SIGNAL_TYPE}_{s.strftime(stamp)}_{e.strftime(stamp)}.csv"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path("runs") / "watttime")


def download_history(region: str, start: datetime, end: datetime, cache_dir: str | Path | None = None,
                     base_url: str | None = None) -> Path:
    """Historical MOER of `region` over [start, end] as a long CSV (point_time,value) in `cache_dir`.

    A file already in the cache is returned without asking WattTime again.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end need a time zone")
    path = cache_path(cache_dir or default_cache_dir(), region, start, end)
    if path.is_file():
        return path
    import requests  # noqa: PLC0415

    client = _client("WattTimeHistorical", base_url)
    try:
        frame = client.get_historical_pandas(start, end, region, signal_type=SIGNAL_TYPE)
    except (requests.RequestException, RuntimeError) as error:
        raise _fail(f"{region} history", error) from error
    if frame.empty:
        raise WattTimeError(f"WattTime returned no {SIGNAL_TYPE} data for {region} in {start} .. {end}")
    frame = frame.drop_duplicates("point_time").sort_values("point_time")   # chunk edges may repeat
    index = pd.DatetimeIndex(pd.to_datetime(frame["point_time"], utc=True))
    series = pd.Series(frame["value"].astype(float).to_numpy(), index=index, name=region)
    return traces.write_long_csv(series, path)


def latest_moer(region: str, base_url: str | None = None) -> tuple[pd.Timestamp, float]:
    """The current MOER of `region`: WattTime's nowcast (the forecast's first point)."""
    import requests  # noqa: PLC0415

    client = _client("WattTimeForecast", base_url)
    try:
        reply = client.get_forecast_json(region, signal_type=SIGNAL_TYPE, horizon_hours=0)
    except (requests.RequestException, RuntimeError) as error:
        raise _fail(f"{region} now", error) from error
    points = reply.get("data") or []
    if not points:
        raise WattTimeError(f"WattTime returned no current {SIGNAL_TYPE} for {region}")
    return pd.Timestamp(points[0]["point_time"]).tz_convert("UTC"), float(points[0]["value"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pilot.energy.watttime", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("history", help="download historical MOER to a cached long CSV")
    p.add_argument("--region", required=True)
    p.add_argument("--start", required=True, help="ISO 8601 with time zone")
    p.add_argument("--end", required=True, help="ISO 8601 with time zone")
    p.add_argument("--cache-dir", default=None, help=f"default: ${CACHE_ENV} or runs/watttime")
    p = sub.add_parser("now", help="print the current MOER (nowcast)")
    p.add_argument("--region", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "history":
            start, end = datetime.fromisoformat(args.start), datetime.fromisoformat(args.end)
            print(download_history(args.region, start, end, args.cache_dir))
        else:
            when, value = latest_moer(args.region)
            print(f"{args.region} {when.isoformat()} {value} {traces.MOER_UNIT}")
    except (WattTimeError, ValueError) as error:
        print(f"watttime: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
