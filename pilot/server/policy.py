"""The round policy: who trains, when a round ends, when the run ends. Pure functions; the loop is a shell.

    curtailed & connected sites   regime      a round ends when
    none                          paused      (no round: wait for a window to open)
    one                           solo        membership changes, or the solo checkpoint interval has passed
    several                       federated   round-duration of simulated time has passed, or membership changes
    any                           -           the energy simulation finished, or the run reached its horizon

Membership changes when a member's window closes (it stops within one optimizer step and its partial work is
aggregated) or another site's window opens (the newcomer joins the next round from the latest global model).
Every reason a round or the run ends is decided here, in one place.
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
    started_at: float                    # simulated time, seconds since the epoch
    duration: float                      # round-duration setting: a federated round's length, simulated seconds
    solo_interval: float | None = None   # solo-checkpoint-interval: a lone site hands in its work this often

    @property
    def regime(self) -> str:
        return regime(self.members)

    @property
    def deadline(self) -> float | None:
        """Simulated time at which the round ends on its own (None: a solo round without an interval)."""
        if self.regime == FEDERATED:
            return self.started_at + self.duration
        return self.started_at + self.solo_interval if self.solo_interval is not None else None


def end_reason(current: Round, now: float, training_now: Set[str], *, energy_finished: bool = False,
               horizon_reached: bool = False, operator_stop: str = "") -> str | None:
    """Why `current` must end at simulated time `now` given who may train now, or None to go on.

    horizon_reached: the global model has taken every optimizer step of the schedule (only ends a round whose
    membership is unchanged; a changed one ends for that reason first)."""
    if operator_stop:
        return f"stopped by the operator: {operator_stop}"
    left = sorted(current.members - training_now)
    joined = sorted(training_now - current.members)
    if left:
        return f"window closed: {', '.join(left)}"
    if joined:
        return f"window opened: {', '.join(joined)}"
    deadline = current.deadline
    if deadline is not None and now >= deadline:
        return "round duration reached" if current.regime == FEDERATED else "solo checkpoint interval"
    if energy_finished:
        return "energy simulation finished"
    if horizon_reached:
        return "horizon"
    return None


def run_outcome(*, steps_done: int, horizon: int, data_exhausted: bool, rounds_done: int, max_rounds: int,
                energy_finished: bool, operator_stop: str = "") -> str | None:
    """Why the run ends now (checked between rounds), or None to go on."""
    if operator_stop:
        return f"stopped by the operator: {operator_stop}"
    if steps_done >= horizon:
        return "horizon"
    if data_exhausted:
        return "data exhausted"
    if 0 < max_rounds <= rounds_done:
        return "max rounds"
    if energy_finished:
        return "energy simulation finished"
    return None
