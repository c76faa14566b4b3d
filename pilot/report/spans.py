"""Interval algebra on sorted, disjoint, half-open spans of simulated seconds (runs have tens of thousands of
step intervals: every operation is one sweep)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Span = tuple[float, float]


def union(intervals: Iterable[Span]) -> list[Span]:
    out: list[Span] = []
    for s, e in sorted((float(s), float(e)) for s, e in intervals if e > s):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def intersect(a: Sequence[Span], b: Sequence[Span]) -> list[Span]:
    """Both sorted and disjoint: one sweep (runs have tens of thousands of step intervals)."""
    out: list[Span] = []
    i = j = 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if e > s:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return union(out)


def subtract(a: Sequence[Span], b: Sequence[Span]) -> list[Span]:
    """`a` minus `b`, both sorted and disjoint."""
    out: list[Span] = []
    j = 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k, at = j, s
        while k < len(b) and b[k][0] < e:
            if b[k][0] > at:
                out.append((at, b[k][0]))
            at = max(at, b[k][1])
            k += 1
        if e > at:
            out.append((at, e))
    return union(out)


def length(intervals: Iterable[Span]) -> float:
    return float(sum(e - s for s, e in intervals))


