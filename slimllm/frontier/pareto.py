"""The Pareto set of candidates on two measured axes, where a candidate is only dominated by a gap larger than the
noise of both measurements.

    >>> fast = Point("q4_0", speed=Interval(220, 210, 230), kld=Interval(0.09, 0.08, 0.10))
    >>> good = Point("q8_0", speed=Interval(150, 148, 152), kld=Interval(0.01, 0.009, 0.011))
    >>> slow_bad = Point("x", speed=Interval(100, 99, 101), kld=Interval(0.5, 0.45, 0.55))
    >>> pareto([fast, good, slow_bad])["x"]        # dominated, and by which candidate
    'q8_0'

Each measurement is an `Interval`: its value with the range it is known to within (min–max of the latency
repeats, the mean KLD ± its standard error). On one axis a candidate is better than another only when the two
ranges do not overlap; where they overlap the two tie. A dominates B when A is better on one axis and not worse on
the other; a candidate no other dominates is on the frontier.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class Interval:
    """A measured value and the range it is known to within (`low` <= `value` <= `high`)."""

    value: float
    low: float
    high: float

    @classmethod
    def exact(cls, value: float) -> Interval:
        return cls(value, value, value)

    @classmethod
    def around(cls, value: float, error: float) -> Interval:
        return cls(value, value - abs(error), value + abs(error))


class Order(Enum):
    BETTER = 1
    TIE = 0
    WORSE = -1


def compare(a: Interval, b: Interval, higher_is_better: bool) -> Order:
    """a against b on one axis: better or worse only when their ranges are apart."""
    if a.low > b.high:
        return Order.BETTER if higher_is_better else Order.WORSE
    if a.high < b.low:
        return Order.WORSE if higher_is_better else Order.BETTER
    return Order.TIE


@dataclass(frozen=True)
class Point:
    """A candidate on one chart: its speed (or size) and its divergence from the dense model."""

    name: str
    speed: Interval
    """Higher is better (tokens/s); give a size as its negative, or use `higher_is_better=False` in `pareto`."""
    kld: Interval
    """Lower is better."""


def dominates(a: Point, b: Point, speed_higher_is_better: bool = True) -> bool:
    orders = [compare(a.speed, b.speed, speed_higher_is_better), compare(a.kld, b.kld, higher_is_better=False)]
    return Order.WORSE not in orders and Order.BETTER in orders


def pareto(points: list[Point], speed_higher_is_better: bool = True) -> dict[str, str | None]:
    """Candidate name -> None when it is on the frontier, else the name of the candidate that dominates it (the one
    with the lowest KLD among those that do, so the note names the best alternative)."""
    verdict: dict[str, str | None] = {}
    for point in points:
        rivals = [other for other in points if other is not point and dominates(other, point, speed_higher_is_better)]
        verdict[point.name] = min(rivals, key=lambda p: (p.kld.value, p.name)).name if rivals else None
    return verdict
