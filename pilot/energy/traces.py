"""MOER trace files: marginal emissions per region over time, read and checked row by row.

Two layouts, both as WattTime exports them:

- wide: a timestamp column (any name; the first column) and one column per region
      timestamp,CAISO_NORTH,SPP_TX
      2025-01-01T00:00:00+00:00,412.0,880.5
  An empty cell is a missing sample of that region (its previous value holds).
- long: `point_time,value`, optionally with a `region` column; without one, the region is the file
  name up to `_co2_moer` (what `WattTimeHistorical.get_historical_csv` writes, e.g.
  `CAISO_NORTH_co2_moer_2025-01-01_2025-01-07.csv`) or else the whole file stem.

Every timestamp needs a time zone (offsets may differ from row to row; all become UTC) and must be later
than the previous one of its region; values must be finite numbers. A bad row is rejected with the file,
the row (1 = the header) and the column. Values are MOER in lbs CO2/MWh, WattTime's unit.

A trace is a step function: a sample's value holds until the next sample of its region; the last
sample holds for the trace's typical spacing (the median), so N samples 5 minutes apart cover 5N minutes.
"""

from __future__ import annotations

import csv
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

LONG_TIME, LONG_VALUE, LONG_REGION = "point_time", "value", "region"
MOER_UNIT = "lbs_co2_per_mwh"


class TraceError(ValueError):
    """A trace file that cannot be used; the message names the file, row and column."""


def _parse_time(text: str, path: Path, row: int, column: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError as error:
        raise TraceError(f"{path}, row {row}, column {column!r}: {text!r} is not an ISO 8601 timestamp") from error
    if when.tzinfo is None:
        raise TraceError(f"{path}, row {row}, column {column!r}: timestamp {text!r} has no time zone "
                         f"(expected an offset, e.g. 2025-01-01T00:00:00+00:00 or ...Z)")
    return when.astimezone(UTC)


def _parse_value(text: str, path: Path, row: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError as error:
        raise TraceError(f"{path}, row {row}, column {column!r}: {text!r} is not a number") from error
    if not math.isfinite(value):
        raise TraceError(f"{path}, row {row}, column {column!r}: {text!r} is not a finite number")
    return value


def region_from_filename(path: Path) -> str:
    stem = path.stem
    return stem.split("_co2_moer")[0] if "_co2_moer" in stem else stem


def read_moer_csv(path: str | Path, regions: set[str] | None = None) -> dict[str, pd.Series]:
    """Region -> MOER series (UTC index, float values) from a wide or long CSV.

    With `regions`, a column (or `region` value) outside them is rejected as unknown, and a region of
    `regions` that the file lacks is an error too.
    """
    path = Path(path)
    try:
        handle = open(path, newline="")
    except FileNotFoundError as error:
        raise TraceError(f"trace file {path} does not exist") from error
    with handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        if len(header) < 2:
            raise TraceError(f"{path}, row 1: expected a header with a timestamp column and at least one "
                             f"region column (wide) or point_time,value (long), got {header}")
        if LONG_TIME in header and LONG_VALUE in header:
            samples = _read_long(path, header, reader)
        else:
            samples = _read_wide(path, header, reader)
    if regions is not None:
        _check_regions(dict.fromkeys(samples, str(path)), regions, str(path))
    out = {}
    for region, (times, values) in samples.items():
        if not times:
            raise TraceError(f"{path}, column {region!r}: no samples")
        out[region] = pd.Series(values, index=pd.DatetimeIndex(times), name=region, dtype=float)
        out[region].attrs["source"] = str(path)
    return out


def _read_wide(path: Path, header: list[str], reader) -> dict[str, tuple[list, list]]:
    time_column, region_columns = header[0], header[1:]
    for i, name in enumerate(region_columns):
        if not name:
            raise TraceError(f"{path}, row 1, column {i + 2}: empty region name in the header")
    if len(set(region_columns)) != len(region_columns):
        raise TraceError(f"{path}, row 1: a region column appears twice: {region_columns}")
    samples: dict[str, tuple[list, list]] = {r: ([], []) for r in region_columns}
    previous: datetime | None = None
    for row, cells in enumerate(reader, start=2):
        if not cells or all(not c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise TraceError(f"{path}, row {row}: {len(cells)} cells, the header has {len(header)}")
        when = _parse_time(cells[0], path, row, time_column)
        if previous is not None and when <= previous:
            raise TraceError(f"{path}, row {row}, column {time_column!r}: {cells[0]} is not after the "
                             f"previous row's {previous.isoformat()} (timestamps must increase)")
        previous = when
        for region, text in zip(region_columns, cells[1:], strict=True):
            if text.strip():
                times, values = samples[region]
                times.append(when)
                values.append(_parse_value(text, path, row, region))
    return samples


def _read_long(path: Path, header: list[str], reader) -> dict[str, tuple[list, list]]:
    t_at, v_at = header.index(LONG_TIME), header.index(LONG_VALUE)
    r_at = header.index(LONG_REGION) if LONG_REGION in header else None
    default_region = region_from_filename(path)
    samples: dict[str, tuple[list, list]] = {}
    for row, cells in enumerate(reader, start=2):
        if not cells or all(not c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise TraceError(f"{path}, row {row}: {len(cells)} cells, the header has {len(header)}")
        region = cells[r_at].strip() if r_at is not None else default_region
        if not region:
            raise TraceError(f"{path}, row {row}, column {LONG_REGION!r}: empty region")
        when = _parse_time(cells[t_at], path, row, LONG_TIME)
        times, values = samples.setdefault(region, ([], []))
        if times and when <= times[-1]:
            raise TraceError(f"{path}, row {row}, column {LONG_TIME!r}: {cells[t_at]} is not after the "
                             f"previous sample of {region} ({times[-1].isoformat()}; timestamps must increase)")
        times.append(when)
        values.append(_parse_value(cells[v_at], path, row, LONG_VALUE))
    return samples


def read_moer_files(paths: list[str | Path], regions: set[str] | None = None,
                    allow_extra: bool = False) -> dict[str, pd.Series]:
    """Several trace files merged; a region found in two files is an error naming both. With `regions`, each
    of them must have data; a region no site uses is an error too, unless `allow_extra` (the prototype's
    traces carry a baseline region: `pilot plan` offers such regions as single-site baselines)."""
    merged: dict[str, pd.Series] = {}
    for path in paths:
        for region, series in read_moer_csv(path).items():
            if region in merged:
                raise TraceError(f"{path}: region {region!r} is also in {merged[region].attrs['source']}")
            merged[region] = series
    if regions is not None:
        _check_regions({r: s.attrs["source"] for r, s in merged.items()}, regions, ", ".join(map(str, paths)),
                       allow_extra)
    return merged


def _check_regions(sources: dict[str, str], regions: set[str], where: str, allow_extra: bool = False) -> None:
    """Every site's region has data, and (unless allow_extra) every region of the trace(s) belongs to a site.

    sources: region -> the file it came from (named in the error)."""
    extra = sorted(set(sources) - set(regions))
    if extra and not allow_extra:
        region = extra[0]
        raise TraceError(f"{sources[region]}, row 1, column {region!r}: unknown region; the sites use "
                         f"{sorted(regions)}")
    missing = sorted(set(regions) - set(sources))
    if missing:
        hint = ""
        if extra:
            hint = (f" ({', '.join(f'{r} in {sources[r]}' for r in extra)}: unknown region(s) to the sites; "
                    f"a typo in the sites' regions?)")
        raise TraceError(f"{where}: no data for region(s) {missing}; the trace has {sorted(sources)}{hint}")


def sample_period_s(series: pd.Series) -> float:
    """The typical spacing of a trace's samples (median), in seconds; how long its last sample holds."""
    seconds = epoch_seconds(series.index)
    if len(seconds) < 2:
        raise TraceError(f"{series.attrs.get('source', 'trace')}, region {series.name!r}: need at least two "
                         "samples to know how long each one holds")
    return float(np.median(np.diff(seconds)))


def epoch_seconds(index: pd.DatetimeIndex) -> np.ndarray:
    """Seconds since 1970-01-01 UTC as floats, whatever the index's resolution."""
    return (index - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)


def value_at(series: pd.Series, when: pd.Timestamp | datetime) -> float:
    """The step-function value at `when` (the latest sample at or before it)."""
    at = series.index.searchsorted(pd.Timestamp(when), side="right") - 1
    if at < 0:
        raise TraceError(f"region {series.name!r}: no sample at or before {when}")
    return float(series.iloc[at])


def write_long_csv(series: pd.Series, path: str | Path) -> Path:
    """Write `point_time,value` (WattTime's long layout), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    frame = pd.DataFrame({LONG_TIME: [t.isoformat() for t in series.index], LONG_VALUE: series.to_numpy()})
    frame.to_csv(tmp, index=False)
    tmp.replace(path)
    return path
