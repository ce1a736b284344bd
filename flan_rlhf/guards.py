"""Guards that keep training from silently diverging."""
from __future__ import annotations


class NonFiniteError(RuntimeError):
    """Too many consecutive iterations had NaN/inf in rewards, values, log-probs or loss."""


class NonFiniteGuard:
    """Counts iterations skipped for NaN/inf inputs and stops the run after ``max_in_a_row``.

    A skipped iteration makes no optimiser step. ``total_skipped`` is logged as
    ``guards/nonfinite_skipped``; the counters are saved in checkpoints.
    """

    def __init__(self, max_in_a_row: int = 3):
        if max_in_a_row < 1:
            raise ValueError(f"ppo.max_nonfinite_in_a_row must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total_skipped = 0

    def record_skip(self, cause: str) -> None:
        """Count a skipped iteration; raise :class:`NonFiniteError` naming ``cause`` at the limit."""
        self.in_a_row += 1
        self.total_skipped += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"{cause} in {self.in_a_row} iterations in a row (ppo.max_nonfinite_in_a_row={self.max_in_a_row}); "
                f"stopping - check the reward for NaN/inf outputs, or lower ppo.learning_rate if values/log-probs diverged"
            )

    def record_ok(self) -> None:
        self.in_a_row = 0

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row = int(state["in_a_row"])
        self.total_skipped = int(state["total_skipped"])
