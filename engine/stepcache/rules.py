"""Each method's rule: from a measure of change per pass, whether the pass may reuse the cached residual.

The rules work on plain numbers (the tensors' measures are taken in :mod:`engine.stepcache.cache`), one instance per
guidance branch of one run, so their whole state is in front of the reader. A threshold of 0 never skips.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    """One pass's decision and the numbers it rests on (kept in the run's trace)."""

    skip: bool
    measure: float | None  #: the method's measure of change at this pass; None where there is nothing to compare
    accumulated: float | None  #: what the rule compared with the threshold; None where it compared nothing


def polynomial(coefficients: Sequence[float]) -> Callable[[float], float]:
    """``numpy.poly1d``: the coefficients from the highest power down."""
    def value(x: float) -> float:
        result = 0.0
        for c in coefficients:
            result = result * x + c
        return result
    return value


@dataclass
class TeaCacheBranch:
    """TeaCache: skip while the accumulated (rescaled) relative L1 change of the modulated input stays below the
    threshold; the first ``retention_steps`` steps always run, and a run resets the accumulator."""

    threshold: float
    rescale: Callable[[float], float]
    retention_steps: int
    accumulated: float = 0.0

    def decide(self, step: int, distance: float | None) -> Decision:
        if distance is None or step < self.retention_steps:
            self.accumulated = 0.0
            return Decision(False, distance, None)
        self.accumulated += self.rescale(distance)
        accumulated = self.accumulated
        if self.threshold > 0 and accumulated < self.threshold:
            return Decision(True, distance, accumulated)
        self.accumulated = 0.0
        return Decision(False, distance, accumulated)


@dataclass
class MagCacheBranch:
    """MagCache: the residual's magnitude changes by a steady ratio between steps; while the accumulated error of
    treating it as unchanged, sum |1 - product of ratios|, stays within the threshold, skip, at most
    ``max_skips`` passes in a row. The first ``retention_steps`` steps always run.

    The ratio is the model's calibrated one in MagCache; here it is the one measured on this run's two last
    consecutive computed passes (no calibrated curve ships for the engine's models), ``None`` until measured."""

    threshold: float
    retention_steps: int
    max_skips: int = 3
    ratio: float | None = None
    accumulated_ratio: float = 1.0
    accumulated_error: float = 0.0
    skipped_in_row: int = 0

    def decide(self, step: int, can_skip: bool) -> Decision:
        if not can_skip or self.ratio is None or step < self.retention_steps:
            self._reset()
            return Decision(False, self.ratio, None)
        self.accumulated_ratio *= self.ratio
        self.accumulated_error += abs(1.0 - self.accumulated_ratio)
        self.skipped_in_row += 1
        error = self.accumulated_error
        if self.threshold > 0 and error <= self.threshold and self.skipped_in_row <= self.max_skips:
            return Decision(True, self.ratio, error)
        self._reset()
        return Decision(False, self.ratio, error)

    def measured(self, ratio: float) -> None:
        """The magnitude ratio of this computed pass's residual to the previous step's computed one."""
        self.ratio = ratio

    def _reset(self) -> None:
        self.accumulated_ratio, self.accumulated_error, self.skipped_in_row = 1.0, 0.0, 0


@dataclass
class FirstBlockBranch:
    """First-block cache: the first block always runs; skip the others while its residual differs from the one of
    the last computed pass by less than the threshold (relative L1)."""

    threshold: float

    def decide(self, distance: float | None) -> Decision:
        skip = distance is not None and self.threshold > 0 and distance < self.threshold
        return Decision(skip, distance, distance)
