"""The regime policy: who trains, and when a round ends. Pure functions; the ServerApp is a shell around them.

    curtailed & connected sites   regime      a round ends when
    none                          paused      (no round: wait for a window to open)
    one                           solo        membership changes (the site trains on, no round trip)
    several                       federated   round-duration of simulated time has passed, or membership changes

Membership changes when a member's window closes (it stops within one optimizer step and its partial work is
aggregated) or another site's window opens (the newcomer joins the next round from the latest global model).
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass

PAUSED, SOLO, FEDERATED = "paused", "solo", "federated"


def regime(members: Set[str]) -> str:
    """The regime for a set of training sites."""
    if not members:
        return PAUSED
    return SOLO if len(members) == 1 else FEDERATED


def members(curtailed: Set[str], connected: Set[str]) -> frozenset[str]:
    """Sites that train now: curtailed and connected (a curtailed site whose node is down cannot)."""
    return frozenset(curtailed) & frozenset(connected)


@dataclass(frozen=True)
class Round:
    number: int
    members: frozenset[str]
    started_at: float            # simulated time, seconds since the epoch
    duration: float              # round-duration setting, simulated seconds

    @property
    def regime(self) -> str:
        return regime(self.members)

    @property
    def deadline(self) -> float | None:
        """Simulated time at which a federated round ends on its own; a solo round has none."""
        return self.started_at + self.duration if self.regime == FEDERATED else None


def end_reason(current: Round, now: float, training_now: Set[str]) -> str | None:
    """Why `current` must end at simulated time `now` given who may train now, or None to go on."""
    left = sorted(current.members - training_now)
    joined = sorted(training_now - current.members)
    if left:
        return f"window closed: {', '.join(left)}"
    if joined:
        return f"window opened: {', '.join(joined)}"
    deadline = current.deadline
    if deadline is not None and now >= deadline:
        return "round duration reached"
    return None
