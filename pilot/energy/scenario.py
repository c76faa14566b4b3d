"""Each site as a Vessim microgrid, built from real weather and real turbine curves.

Renewable-surplus sites: PV from pvlib (solar position, plane-of-array irradiance, Faiman cell
temperature, PVWatts DC and inverter) and wind from windpowerlib (the TMY 10 m wind speed extrapolated to
hub height with Hellman's law, through a turbine's measured power curve), driven by the typical
meteorological year files pvlib ships, against the site's own load (a base plus a daytime bump).
MOER sites: the MOER trace of the site's region as a Vessim grid signal, against the site's idle load.

A TMY file is one typical year; its hours are re-stamped onto the scenario's first year (in UTC) and
repeat every 365 days, so a scenario may run longer than a year. Hourly values are interpolated linearly
onto the step grid.

    profiles = site_profiles(scenario)          # name -> DataFrame(generation_w, pv_w, wind_w, load_w | moer)
    env = build_environment(scenario, profiles, first_step=0, last_step=scenario.steps)
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from pilot.energy import traces
from pilot.energy.sites import Scenario, ScenarioError, Site

YEAR_S = 365 * 86400
PV_GAMMA_PDC = -0.004          # PV power temperature coefficient, 1/K (typical crystalline silicon)
PV_DC_AC_RATIO = 1.1           # inverter sized 10% below the array's peak
HELLMAN_EXPONENT = 1 / 7       # wind shear over open land
TMY_WIND_HEIGHT_M = 10.0       # anemometer height of TMY wind speed
LOAD_DAY_START_H, LOAD_DAY_END_H = 7.0, 19.0   # the load's daytime bump, local standard time
WATTTIME_SOURCE = "watttime"   # moer_trace = "watttime": download the span through the official client
DAYS_BEFORE_MONTH = np.cumsum([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30])   # a year of 365 days


# ------------------------------------------------------------------ weather
def weather_path(name: str) -> Path:
    """A TMY file: a path, or the name of one that pvlib ships."""
    path = Path(name)
    if path.is_file():
        return path
    import pvlib  # noqa: PLC0415 - slow import, only when a scenario is built

    shipped = Path(pvlib.__file__).parent / "data" / name
    if shipped.is_file():
        return shipped
    raise ScenarioError(f"weather file {name!r} is neither a path nor one of pvlib's TMY files "
                        "(723170TYA.CSV, 703165TY.csv, 12839.tm2)")


@functools.lru_cache(maxsize=16)
def read_weather(name: str, year: int) -> tuple[pd.DataFrame, dict]:
    """Hourly weather of a typical year on the UTC hours of `year` (8760 rows), and the station's metadata.

    Columns: ghi, dni, dhi (W/m2), temp_air (C), wind_speed (m/s at 10 m). Metadata: latitude, longitude,
    altitude, tz (hours from UTC, standard time).
    """
    from pvlib import iotools  # noqa: PLC0415

    path = weather_path(name)
    if path.suffix.lower() == ".tm2":
        raw, meta = iotools.read_tmy2(str(path))
        frame = pd.DataFrame({"ghi": raw["GHI"], "dni": raw["DNI"], "dhi": raw["DHI"],
                              "temp_air": raw["DryBulb"] / 10.0, "wind_speed": raw["Wspd"] / 10.0})
        tz = float(meta["TZ"])
    else:
        raw, meta = iotools.read_tmy3(str(path), map_variables=True)
        frame = raw[["ghi", "dni", "dhi", "temp_air", "wind_speed"]].astype(float)
        tz = float(meta["TZ"])
    if len(frame) != 8760:
        raise ScenarioError(f"weather file {path}: expected 8760 hourly rows, got {len(frame)}")
    # hour of the typical year, from its own month/day/hour stamps (their years differ month by month)
    # (a 24:00 stamp that pvlib moved to Feb 29 of a leap data year lands on Mar 1 00:00, which is free)
    local = frame.index
    day_of_year = DAYS_BEFORE_MONTH[local.month.to_numpy() - 1] + np.minimum(local.day.to_numpy(), 31) - 1
    hour_of_year = day_of_year.astype(np.int64) * 24 + local.hour.to_numpy()
    utc_seconds = (hour_of_year * 3600 - tz * 3600) % YEAR_S   # local standard time -> UTC, wrapped
    order = np.argsort(utc_seconds)
    if len(np.unique(utc_seconds)) != len(utc_seconds):
        raise ScenarioError(f"weather file {path}: its hours do not cover one year exactly once")
    year_start = pd.Timestamp(year=year, month=1, day=1, tz="UTC")
    index = year_start + pd.to_timedelta(utc_seconds[order], unit="s")
    frame = frame.iloc[order].set_axis(index)
    meta_out = {"latitude": float(meta["latitude"]), "longitude": float(meta["longitude"]),
                "altitude": float(meta.get("altitude", 0.0)), "tz": tz, "file": path.name}
    return frame, meta_out


# ------------------------------------------------------------------ power models
def pv_power_w(weather: pd.DataFrame, meta: dict, kwp: float, tilt: float, azimuth: float) -> np.ndarray:
    """AC power of a PV array (PVWatts) from hourly irradiance; hour-ending TMY stamps, sun at mid-hour."""
    if kwp <= 0:
        return np.zeros(len(weather))
    import pvlib  # noqa: PLC0415

    mid_hour = weather.index - pd.Timedelta(minutes=30)
    sun = pvlib.solarposition.get_solarposition(mid_hour, meta["latitude"], meta["longitude"], meta["altitude"])
    poa = pvlib.irradiance.get_total_irradiance(tilt, azimuth, sun["apparent_zenith"].to_numpy(),
                                                sun["azimuth"].to_numpy(), weather["dni"].to_numpy(),
                                                weather["ghi"].to_numpy(), weather["dhi"].to_numpy())
    poa_global = np.nan_to_num(np.asarray(poa["poa_global"], dtype=float), nan=0.0).clip(min=0.0)
    cell = pvlib.temperature.faiman(poa_global, weather["temp_air"].to_numpy(), weather["wind_speed"].to_numpy())
    dc = pvlib.pvsystem.pvwatts_dc(poa_global, cell, kwp * 1000.0, PV_GAMMA_PDC)
    ac = pvlib.inverter.pvwatts(dc, kwp * 1000.0 / PV_DC_AC_RATIO)
    return np.nan_to_num(np.asarray(ac, dtype=float), nan=0.0).clip(min=0.0)


def wind_power_w(weather: pd.DataFrame, turbine_type: str, hub_height_m: float, turbines: int) -> np.ndarray:
    """Power of `turbines` identical turbines (windpowerlib power curve) from the TMY wind speed."""
    if turbines <= 0:
        return np.zeros(len(weather))
    import windpowerlib  # noqa: PLC0415

    try:
        with warnings.catch_warnings():   # windpowerlib 0.2.2 uses a pandas keyword that pandas 3 deprecates
            warnings.simplefilter("ignore", DeprecationWarning)
            turbine = windpowerlib.WindTurbine(hub_height=hub_height_m, turbine_type=turbine_type)
    except (KeyError, ValueError) as error:
        raise ScenarioError(f"windpowerlib has no power curve for turbine {turbine_type!r}: {error}") from error
    if turbine.power_curve is None:
        raise ScenarioError(f"windpowerlib has no power curve for turbine {turbine_type!r}")
    speed = windpowerlib.wind_speed.hellman(weather["wind_speed"], TMY_WIND_HEIGHT_M, hub_height_m,
                                            hellman_exponent=HELLMAN_EXPONENT)
    power = windpowerlib.power_output.power_curve(speed, turbine.power_curve["wind_speed"],
                                                  turbine.power_curve["value"])
    return np.asarray(power, dtype=float) * turbines


def load_w(utc_seconds: np.ndarray, tz_hours: float, base_kw: float, peak_kw: float) -> np.ndarray:
    """The site's own load: `base_kw` plus a half-sine bump of `peak_kw` over the local working day."""
    local_hour = ((utc_seconds / 3600.0) + tz_hours) % 24.0
    span = LOAD_DAY_END_H - LOAD_DAY_START_H
    phase = (local_hour - LOAD_DAY_START_H) / span
    bump = np.where((phase > 0) & (phase < 1), np.sin(np.pi * phase), 0.0)
    return (base_kw + peak_kw * bump) * 1000.0


# ------------------------------------------------------------------ profiles on the step grid
def step_times(scenario: Scenario) -> np.ndarray:
    """Epoch seconds of every step of the scenario."""
    start = scenario.start.timestamp()
    return start + np.arange(scenario.steps, dtype=np.float64) * scenario.step_s


def surplus_profile(site: Site, scenario: Scenario, times: np.ndarray) -> pd.DataFrame:
    o = site.options
    weather, meta = read_weather(str(o["weather"]), scenario.start.year)
    hourly = traces.epoch_seconds(weather.index)
    pv = pv_power_w(weather, meta, float(o["pv_kwp"]), float(o["pv_tilt"]), float(o["pv_azimuth"]))
    wind = wind_power_w(weather, str(o["turbine_type"]), float(o["hub_height_m"]), int(o["turbines"]))
    origin = pd.Timestamp(year=scenario.start.year, month=1, day=1, tz="UTC").timestamp()
    x = (times - origin) % YEAR_S
    xp = (hourly - origin) % YEAR_S
    pv_steps = np.interp(x, xp, pv, period=YEAR_S)
    wind_steps = np.interp(x, xp, wind, period=YEAR_S)
    load = load_w(times, meta["tz"], float(o["load_base_kw"]), float(o["load_peak_kw"]))
    return pd.DataFrame({"pv_w": pv_steps, "wind_w": wind_steps, "generation_w": pv_steps + wind_steps,
                         "load_w": load}, index=pd.to_datetime(times, unit="s", utc=True))


def moer_profile(site: Site, scenario: Scenario, times: np.ndarray,
                 moer: Mapping[str, pd.Series] | None = None) -> pd.DataFrame:
    if moer is None or site.region not in moer:
        source = site.options.get("moer_trace")
        if not source:
            raise ScenarioError(f"site {site.name}: a 'moer' site needs moer_trace = FILE (or \"watttime\")")
        if source == WATTTIME_SOURCE:   # the scenario's span from WattTime, cached after the first download
            from pilot.energy import watttime  # noqa: PLC0415

            source = watttime.download_history(site.region, scenario.start, scenario.end)
        moer = traces.read_moer_csv(source)
        if site.region not in moer:
            raise traces.TraceError(f"{source}: no column for region {site.region!r} "
                                    f"of site {site.name}; the file has {sorted(moer)}")
    series = moer[site.region]
    sample_times = traces.epoch_seconds(series.index)
    end = sample_times[-1] + traces.sample_period_s(series)
    if times[0] < sample_times[0] or times[-1] >= end:
        raise traces.TraceError(f"{series.attrs.get('source', 'MOER trace')}, region {site.region!r}: covers "
                                f"{series.index[0]} .. {pd.Timestamp(end, unit='s', tz='UTC')}, but the scenario "
                                f"runs {scenario.start} .. {scenario.end}")
    at = np.searchsorted(sample_times, times, side="right") - 1
    load = np.full(len(times), site.idle_kw * 1000.0)
    return pd.DataFrame({"moer": series.to_numpy()[at], "load_w": load},
                        index=pd.to_datetime(times, unit="s", utc=True))


def site_profiles(scenario: Scenario, moer: Mapping[str, pd.Series] | None = None) -> dict[str, pd.DataFrame]:
    """Per site, its signal on the step grid of the whole scenario."""
    times = step_times(scenario)
    return {site.name: surplus_profile(site, scenario, times) if site.signal == "surplus"
            else moer_profile(site, scenario, times, moer) for site in scenario.sites}


def raw_curtailed(site: Site, scenario: Scenario, profile: pd.DataFrame) -> np.ndarray:
    """The raw signal per step: MOER below the threshold, or generation above load."""
    if site.signal == "moer":
        return profile["moer"].to_numpy() < float(site.options.get("threshold") or scenario.threshold)
    return profile["generation_w"].to_numpy() > profile["load_w"].to_numpy()


# ------------------------------------------------------------------ Vessim
def build_environment(scenario: Scenario, profiles: Mapping[str, pd.DataFrame], first_step: int,
                      last_step: int):
    """A Vessim environment for steps [first_step, last_step) of the scenario: one microgrid per site."""
    import vessim as vs  # noqa: PLC0415

    sim_start = pd.Timestamp(scenario.start) + timedelta(seconds=first_step * scenario.step_s)
    env = vs.Environment(sim_start=sim_start, step_size=scenario.step_s)
    offsets = np.arange(last_step - first_step, dtype=np.float64) * scenario.step_s
    for site in scenario.sites:
        profile = profiles[site.name].iloc[first_step:last_step]
        if site.signal == "surplus":
            data = pd.DataFrame({c: profile[c].to_numpy() for c in ("pv_w", "wind_w", "load_w")}, index=offsets)
            trace = vs.Trace(data, repr_=f"{site.name} {site.options['weather']}")
            actors = [vs.Producer("pv", trace.select("pv_w")), vs.Producer("wind", trace.select("wind_w")),
                      vs.Consumer("load", trace.select("load_w"))]
            signals = None
        else:
            data = pd.DataFrame({"moer": profile["moer"].to_numpy(), "load_w": profile["load_w"].to_numpy()},
                                index=offsets)
            trace = vs.Trace(data, repr_=f"{site.name} {site.region}")
            actors = [vs.Consumer("load", trace.select("load_w"))]
            signals = {"moer": trace.select("moer")}
        env.add_microgrid(actors=actors, dispatchables=[vs.GridConnection("grid")], grid_signals=signals,
                          name=site.name)
    return env
