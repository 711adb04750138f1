"""When did a training run stop moving? The rule of docs/method.md ("Convergence"): the first budget from which
held-out R² stays within `r2_tolerance` of its final value and L0 within `l0_tolerance` (relative) of its
final value, at every later budget checkpoint too."""

from __future__ import annotations

R2_TOLERANCE = 0.005
L0_TOLERANCE = 0.05


def converged_at(history: list[dict[str, float]], r2_tolerance: float = R2_TOLERANCE,
                 l0_tolerance: float = L0_TOLERANCE) -> float | None:
    """`tokens_seen` of the first checkpoint of `history` (budget order) from which every later one stays within
    the tolerances of the last; None ("not converged") when only the last does, since one point shows no
    plateau."""
    final = history[-1] if history else None

    def settled(row: dict[str, float]) -> bool:
        return (abs(row["r2"] - final["r2"]) <= r2_tolerance
                and abs(row["l0"] - final["l0"]) <= l0_tolerance * abs(final["l0"]))

    first = len(history)
    while first > 0 and settled(history[first - 1]):
        first -= 1
    return history[first]["tokens_seen"] if first < len(history) - 1 else None
