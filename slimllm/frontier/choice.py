"""The choice: the best measured candidate that meets the user's constraints, and why, in one paragraph.

    >>> choice = choose(results, FrontierSettings(min_speedup=1.5, max_kld=0.1))
    >>> choice.winner.name, choice.summary

With a speed or size constraint the winner is the candidate closest to the dense model (lowest mean KLD) among those
that meet every constraint; with only quality constraints (`max_kld`, `max_ppl_ratio`) it is the fastest of them.
When nothing meets them, the summary names the candidate that comes closest and by how much it misses each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slimllm.frontier.results import CandidateResult

SPEED_CONSTRAINTS = ("min_speedup", "min_tokens_per_s", "max_size")
FLAGS = {"min_speedup": "--min-speedup", "min_tokens_per_s": "--min-tokens-per-s", "max_size": "--max-size",
         "max_kld": "--max-kld", "max_ppl_ratio": "--max-ppl-ratio"}


@dataclass
class Check:
    """One constraint on one candidate: the candidate's value, the limit, and the relative miss (0 when met)."""

    name: str
    value: float | None
    limit: float

    @property
    def lower_bound(self) -> bool:
        return self.name.startswith("min_")

    @property
    def miss(self) -> float:
        """How far the value is from meeting the limit, as a fraction of the limit (inf when not measured)."""
        if self.value is None:
            return float("inf")
        gap = (self.limit - self.value) if self.lower_bound else (self.value - self.limit)
        return max(gap, 0.0) / self.limit

    def describe(self) -> str:
        if self.value is None:
            return f"{FLAGS[self.name]} {self.limit:g}: not measured"
        relation, side = ("<", "short") if self.lower_bound else (">", "over")
        return (f"{FLAGS[self.name]} {self.limit:g} ({self.value:.4g} {relation} {self.limit:g}, "
                f"{100 * self.miss:.1f} % {side})")


@dataclass
class Choice:
    winner: CandidateResult | None
    summary: str
    """One paragraph: why the winner won and what it beat, or which constraint came closest and by how much."""
    checks: dict[str, list[Check]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        checks = {name: [c.__dict__ | {"miss": c.miss} for c in per] for name, per in self.checks.items()}
        return {"winner": self.winner.name if self.winner else None, "summary": self.summary, "checks": checks}


def values(result: CandidateResult, baseline: CandidateResult | None) -> dict[str, float | None]:
    """What the constraints read off one candidate."""
    decode = result.decode_tokens_per_s
    base = baseline.decode_tokens_per_s if baseline is not None else None
    return {
        "min_speedup": decode / base if decode is not None and base else None,
        "min_tokens_per_s": decode,
        "max_size": result.size_bytes / 2**20,
        "max_kld": result.kld,
        "max_ppl_ratio": result.ppl_ratio,
    }


def choose(results: list[CandidateResult], constraints: dict[str, float], baseline: str) -> Choice:
    """The best candidate under `constraints` (see the module's docstring); `baseline` names the speedup's base."""
    if not constraints:
        return Choice(None, "No constraint was given, so no candidate was chosen: pass --min-speedup, "
                            "--min-tokens-per-s, --max-size, --max-kld or --max-ppl-ratio.")
    base = next((r for r in results if r.name == baseline), None)
    read = {r.name: values(r, base) for r in results}
    checks = {r.name: [Check(n, read[r.name][n], limit) for n, limit in constraints.items()] for r in results}
    feasible = [r for r in results if all(c.miss == 0 for c in checks[r.name])]
    if not feasible:
        return Choice(None, _nothing_fits(results, checks), checks)
    speed_first = not any(name in constraints for name in SPEED_CONSTRAINTS)
    if speed_first:
        ranked = sorted(feasible, key=lambda r: (-(r.decode_tokens_per_s or 0.0), r.kld))
    else:
        ranked = sorted(feasible, key=lambda r: (r.kld, -(r.decode_tokens_per_s or 0.0)))
    winner = ranked[0]
    return Choice(winner, _why(winner, ranked[1:], results, checks, constraints, base, speed_first), checks)


def _why(winner, others, results, checks, constraints, base, speed_first) -> str:
    meets = ", ".join(f"{FLAGS[n]} {limit:g}" for n, limit in constraints.items())
    text = f"{winner.name} won: {winner.describe(base)}. It meets {meets}"
    goal = "the fastest decoder" if speed_first else "the closest to the dense model (lowest mean KLD)"
    text += f" and is {goal} of the {len(others) + 1} candidates that do."
    if others:
        runner_up = others[0]
        text += f" Runner-up: {runner_up.name} ({runner_up.describe(base)})."
    rejected = [r for r in results if r is not winner and r not in others]
    better = [r for r in rejected if (r.decode_tokens_per_s or 0) > (winner.decode_tokens_per_s or 0)
              or r.kld < winner.kld]
    if better:
        reasons = "; ".join(
            f"{r.name}: {', '.join(c.describe() for c in checks[r.name] if c.miss > 0)}" for r in better[:3]
        )
        text += f" Rejected although faster or closer: {reasons}."
    return text


def _nothing_fits(results: list[CandidateResult], checks: dict[str, list[Check]]) -> str:
    closest = min(results, key=lambda r: (max(c.miss for c in checks[r.name]), sum(c.miss for c in checks[r.name])))
    missed = [c for c in checks[closest.name] if c.miss > 0]
    worst = max(missed, key=lambda c: c.miss)
    return (f"No candidate meets every constraint. Closest: {closest.name}, which misses "
            + "; ".join(c.describe() for c in missed)
            + f". The constraint it misses most is {FLAGS[worst.name]}, by {100 * worst.miss:.1f} %.")
