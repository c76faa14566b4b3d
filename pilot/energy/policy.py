"""Curtailment policy: pure functions from a raw signal to curtailment windows.

Times are seconds since the epoch (UTC); a window is a half-open interval (start, end).

Raw windows: a sample is curtailed when its signal says so (MOER below the threshold; renewable
generation above load). Samples are a step function: a sample's state holds until the next sample, the
last one until the trace's end.

Effective windows add hysteresis, decided causally (the live simulation cannot see the future):
- `min_on_s`: a window opens only after the raw signal has been curtailed for `min_on_s`; it opens then
  (at raw start + min_on_s). A raw window no longer than that never opens one.
- `min_off_s`: an open window closes only after the raw signal has been not curtailed for `min_off_s`
  (the reference's 10-minute leave delay); it closes then (at raw end + min_off_s). A raw gap no longer
  than that is bridged.
With both 0, effective windows are the raw ones. `offline_hysteresis` (whole windows) and
`decide` (one sample at a time, what the simulation runs) agree on a regular sample grid; a test keeps
them in step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Window = tuple[float, float]


# ------------------------------------------------------------------ raw windows
def below(values: Sequence[float] | np.ndarray, threshold: float) -> np.ndarray:
    """Curtailed samples of a MOER signal: strictly below the threshold."""
    return np.asarray(values, dtype=float) < threshold


def step_windows(times: Sequence[float] | np.ndarray, flags: Sequence[bool] | np.ndarray,
                 end: float) -> list[Window]:
    """Windows where a step function of booleans is True; sample i holds until sample i+1, the last until `end`."""
    times = np.asarray(times, dtype=float)
    flags = np.asarray(flags, dtype=bool)
    if len(times) != len(flags):
        raise ValueError(f"{len(times)} times but {len(flags)} flags")
    if len(times) == 0:
        return []
    if np.any(np.diff(times) <= 0):
        raise ValueError("sample times must increase")
    if end <= times[-1]:
        raise ValueError(f"end {end} must be after the last sample {times[-1]}")
    edges = np.diff(flags.astype(np.int8), prepend=0, append=0)
    bounds = np.append(times, end)
    starts, ends = bounds[np.flatnonzero(edges == 1)], bounds[np.flatnonzero(edges == -1)]
    return [(float(s), float(e)) for s, e in zip(starts, ends, strict=True)]


# ------------------------------------------------------------------ hysteresis
def offline_hysteresis(raw: Iterable[Window], min_on_s: float, min_off_s: float, end: float) -> list[Window]:
    """Effective windows from sorted, disjoint raw windows (see the module docstring); clipped at `end`."""
    out: list[Window] = []
    opened: float | None = None      # start of the effective window being built
    last_raw_end = 0.0
    for start, stop in raw:
        if opened is not None:
            if start - last_raw_end <= min_off_s:   # came back before the leave delay ran out: bridge
                last_raw_end = stop
                continue
            out.append((opened, min(last_raw_end + min_off_s, end)))
            opened = None
        if stop - start > min_on_s:
            opened, last_raw_end = start + min_on_s, stop
    if opened is not None:
        out.append((opened, min(last_raw_end + min_off_s, end)))
    return [w for w in out if w[1] > w[0]]


@dataclass(frozen=True)
class PolicyState:
    """What the online policy remembers about one site between samples."""

    curtailed: bool = False
    pending_since: float | None = None   # when the raw signal started to disagree with `curtailed`
    since: float | None = None           # when the effective state last changed

    def to_fields(self) -> dict[str, str]:
        return {"curtailed": str(int(self.curtailed)),
                "pending_since": "" if self.pending_since is None else repr(self.pending_since),
                "since": "" if self.since is None else repr(self.since)}

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> PolicyState:
        def number(key: str) -> float | None:
            return float(fields[key]) if fields.get(key) else None
        return cls(fields.get("curtailed") == "1", number("pending_since"), number("since"))


def decide(state: PolicyState, now: float, raw: bool, min_on_s: float, min_off_s: float) -> PolicyState:
    """One sample of the online policy: the new state (its `curtailed` is the effective decision)."""
    if raw == state.curtailed:
        return PolicyState(state.curtailed, None, state.since) if state.pending_since is not None else state
    pending = now if state.pending_since is None else state.pending_since
    delay = min_on_s if raw else min_off_s
    if now - pending >= delay:
        return PolicyState(raw, None, now)
    return PolicyState(state.curtailed, pending, state.since)


def online_windows(times: Sequence[float], flags: Sequence[bool], end: float,
                   min_on_s: float, min_off_s: float) -> list[Window]:
    """Effective windows by running `decide` over every sample (what the simulation does)."""
    state, opened, out = PolicyState(), None, []
    for t, raw in zip(times, flags, strict=True):
        new = decide(state, float(t), bool(raw), min_on_s, min_off_s)
        if new.curtailed and not state.curtailed:
            opened = float(t)
        elif state.curtailed and not new.curtailed:
            out.append((opened, float(t)))
        state = new
    if state.curtailed:
        out.append((opened, end))
    return out


# ------------------------------------------------------------------ summaries
def total_seconds(windows: Iterable[Window]) -> float:
    return float(sum(e - s for s, e in windows))


def overlap_seconds(windows_by_site: Mapping[str, Sequence[Window]], start: float, end: float) -> dict[int, float]:
    """Seconds of [start, end) during which exactly k sites are curtailed, for k = 0..len(sites)."""
    deltas: dict[float, int] = {}
    for windows in windows_by_site.values():
        for s, e in windows:
            s, e = max(s, start), min(e, end)
            if e > s:
                deltas[s] = deltas.get(s, 0) + 1
                deltas[e] = deltas.get(e, 0) - 1
    out = {k: 0.0 for k in range(len(windows_by_site) + 1)}
    count, at = 0, start
    for t in sorted(deltas):
        out[count] += t - at
        count, at = count + deltas[t], t
    out[count] += end - at
    return out


def inside_seconds(windows: Sequence[Window], start: float, end: float) -> float:
    """How much of [start, end) lies inside the (sorted, disjoint) windows."""
    return float(sum(max(0.0, min(e, end) - max(s, start)) for s, e in windows))
