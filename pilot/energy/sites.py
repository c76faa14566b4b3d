"""The scenario file: which sites exist, what signal decides their curtailment, and the simulated clock.

One TOML file configures everything (the shipped default is `data/default_scenario.toml`):

    [scenario]
    start = "2025-01-01T00:00:00Z"   # the simulated clock's first instant (with a time zone)
    end = "2026-01-01T00:00:00Z"     # exclusive
    step_s = 300                     # one Vessim step
    threshold = 100.0                # MOER sites: curtailed while MOER < threshold (lbs CO2/MWh)
    min_on_s = 0                     # hysteresis, see policy.py
    min_off_s = 600

    [[sites]]
    name = "client_0"                # the Flower node's `name`
    region = "US-NC-GREENSBORO"      # grid region (a WattTime region code for MOER sites)
    signal = "surplus"               # "surplus" (PV + wind vs. load) or "moer" (a trace column)
    gpus = 4
    gpu_train_kw = 0.7               # per GPU while training (host share included)
    gpu_idle_kw = 0.1                # per GPU while idle
    ...signal-specific keys (see SURPLUS_KEYS / MOER_KEYS)

Relative paths (`weather`, `moer_trace`) are resolved against the TOML file's folder; a bare `weather`
name that is not there is looked up among the TMY files pvlib ships.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_SCENARIO = DATA_DIR / "default_scenario.toml"

SIGNALS = ("surplus", "moer")
DEFAULT_THRESHOLD = 100.0   # lbs CO2/MWh, as in the reference study
DEFAULT_STEP_S = 300

# keys a site may have, with their defaults (None: required)
COMMON_KEYS: dict[str, Any] = {"name": None, "region": None, "signal": None, "gpus": None,
                               "gpu_train_kw": None, "gpu_idle_kw": None}
SURPLUS_KEYS: dict[str, Any] = {
    "weather": None,          # TMY file (pvlib's 723170TYA.CSV, 703165TY.csv, 12839.tm2, or a path)
    "pv_kwp": 0.0,            # PV peak DC power
    "pv_tilt": 25.0, "pv_azimuth": 180.0,
    "turbines": 0,            # number of wind turbines
    "turbine_type": "E-53/800",   # a windpowerlib (oedb) turbine with a power curve
    "hub_height_m": 73.0,
    "load_base_kw": None,     # the site's own load: a base ...
    "load_peak_kw": 0.0,      # ... plus a daytime bump (local 07-19 h, peak at 13 h)
}
MOER_KEYS: dict[str, Any] = {"moer_trace": None,   # a MOER trace file with a column for `region`, or
                             #   "watttime": the scenario's span downloaded with WattTime's client, cached
                             "threshold": None}    # optional: this site's own threshold


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Site:
    name: str
    region: str
    signal: str
    gpus: int
    gpu_train_kw: float
    gpu_idle_kw: float
    options: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def train_kw(self) -> float:
        return self.gpus * self.gpu_train_kw

    @property
    def idle_kw(self) -> float:
        return self.gpus * self.gpu_idle_kw

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (what the simulation publishes for consumers)."""
        return {"name": self.name, "region": self.region, "signal": self.signal, "gpus": self.gpus,
                "gpu_train_kw": self.gpu_train_kw, "gpu_idle_kw": self.gpu_idle_kw}


@dataclass(frozen=True)
class Scenario:
    start: datetime
    end: datetime
    step_s: int
    threshold: float
    min_on_s: float
    min_off_s: float
    sites: tuple[Site, ...]
    source: Path | None = None

    @property
    def steps(self) -> int:
        return int((self.end - self.start).total_seconds()) // self.step_s

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site {name!r}; sites: {[s.name for s in self.sites]}")


def parse_time(value: Any, where: str) -> datetime:
    """An ISO 8601 instant with a time zone (TOML datetimes or strings)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as error:
            raise ScenarioError(f"{where}: {value!r} is not an ISO 8601 time") from error
    if not isinstance(value, datetime):
        raise ScenarioError(f"{where}: expected a date-time with time zone, got {value!r}")
    if value.tzinfo is None:
        raise ScenarioError(f"{where}: {value.isoformat()} has no time zone (add Z or +00:00)")
    return value


def _number(table: dict, key: str, where: str, kind: type = float) -> Any:
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScenarioError(f"{where}: {key} must be a number, got {value!r}")
    if kind is int and not float(value).is_integer():
        raise ScenarioError(f"{where}: {key} must be a whole number, got {value!r}")
    return kind(value)


def site_from_table(table: dict[str, Any], where: str, base_dir: Path | None = None) -> Site:
    """A Site from one `[[sites]]` table; unknown or missing keys are errors that say which."""
    signal = table.get("signal")
    if signal not in SIGNALS:
        raise ScenarioError(f"{where}: signal must be one of {SIGNALS}, got {signal!r}")
    allowed = {**COMMON_KEYS, **(SURPLUS_KEYS if signal == "surplus" else MOER_KEYS)}
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {unknown} for a {signal!r} site; known: {sorted(allowed)}")
    values = {**{k: v for k, v in allowed.items() if v is not None}, **table}
    missing = sorted(k for k, v in allowed.items() if v is None and k not in table and k != "threshold")
    if missing:
        raise ScenarioError(f"{where}: missing key(s) {missing}")
    for key in ("name", "region"):
        if not isinstance(values[key], str) or not values[key]:
            raise ScenarioError(f"{where}: {key} must be a non-empty string, got {values[key]!r}")
    gpus = _number(values, "gpus", where, int)
    train_kw = _number(values, "gpu_train_kw", where)
    idle_kw = _number(values, "gpu_idle_kw", where)
    if gpus < 0 or train_kw < 0 or idle_kw < 0:
        raise ScenarioError(f"{where}: gpus and powers must not be negative")
    options = {k: v for k, v in values.items() if k not in COMMON_KEYS}
    for key, default in (SURPLUS_KEYS if signal == "surplus" else MOER_KEYS).items():
        if key in options and (isinstance(default, (int, float)) or key in ("load_base_kw", "threshold")):
            options[key] = _number(options, key, where, int if key == "turbines" else float)
        elif key in options and not isinstance(options[key], str):
            raise ScenarioError(f"{where}: {key} must be a string, got {options[key]!r}")
    for key in ("weather", "moer_trace"):
        if options.get(key) and base_dir is not None and (base_dir / options[key]).is_file():
            options[key] = str((base_dir / options[key]).resolve())
    return Site(values["name"], values["region"], signal, gpus, train_kw, idle_kw, options)


def load_scenario(path: str | Path | None = None) -> Scenario:
    """Read and check a scenario file (the shipped default when `path` is None)."""
    path = Path(path) if path else DEFAULT_SCENARIO
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError as error:
        raise ScenarioError(f"scenario file {path} does not exist") from error
    except tomllib.TOMLDecodeError as error:
        raise ScenarioError(f"{path}: not valid TOML ({error})") from error
    head = doc.get("scenario", {})
    where = f"{path} [scenario]"
    unknown = sorted(set(head) - {"start", "end", "step_s", "threshold", "min_on_s", "min_off_s"})
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {unknown}")
    for key in ("start", "end"):
        if key not in head:
            raise ScenarioError(f"{where}: missing key {key!r}")
    head = {"step_s": DEFAULT_STEP_S, "threshold": DEFAULT_THRESHOLD, "min_on_s": 0, "min_off_s": 0, **head}
    start, end = parse_time(head["start"], f"{where} start"), parse_time(head["end"], f"{where} end")
    step_s = _number(head, "step_s", where, int)
    if step_s <= 0 or end <= start:
        raise ScenarioError(f"{where}: need step_s > 0 and end after start")
    tables = doc.get("sites", [])
    if not tables:
        raise ScenarioError(f"{path}: no [[sites]] tables")
    sites = tuple(site_from_table(t, f"{path} [[sites]] #{i + 1}", path.parent) for i, t in enumerate(tables))
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ScenarioError(f"{path}: site names must be unique, got {names}")
    return Scenario(start, end, step_s, _number(head, "threshold", where), _number(head, "min_on_s", where),
                    _number(head, "min_off_s", where), sites, path)


def parse_site_map(text: str) -> dict[str, str]:
    """`client_0=CAISO_NORTH,client_1=SPP_TX` -> {"client_0": "CAISO_NORTH", ...} (the --sites option)."""
    sites: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, region = item.partition("=")
        if not sep or not name.strip() or not region.strip():
            raise ScenarioError(f"--sites: {item!r} is not NAME=REGION (e.g. client_0=CAISO_NORTH)")
        if name.strip() in sites:
            raise ScenarioError(f"--sites: site {name.strip()!r} given twice")
        sites[name.strip()] = region.strip()
    if not sites:
        raise ScenarioError("--sites: no NAME=REGION pairs given")
    return sites
