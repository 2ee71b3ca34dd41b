"""A request's step cache: the DiT calls of one stage run, per guidance branch, through the method's rule.

Made fresh by the stage for every request (:meth:`StepCache.open`), so its state is the request's alone; the stage
routes each branch's transformer call through :meth:`StepCache.run` with the branch's name and the step index.
Every pass's decision and the numbers it rests on are kept in :attr:`StepCache.trace`; the counts and the time
saved in :attr:`StepCache.stats`. Caches opened while :func:`engine.stepcache.stats.collect` is active on the
thread are handed to it (the worker reports them with the stage's result).

Sequence parallelism: the decision must be one value on every rank of a group that computes slices of one pass's
tokens, or the ranks' collectives inside the blocks would no longer match. Every measure is therefore taken as sums
over the local tensor passed through ``reduce`` (identity by default; an all-reduce of the sums across the group's
ranks where a pass's tokens are split), so that every rank takes the same decision from the full tensor's measure.
With CFG parallelism each rank computes its own branch and holds only that branch's state: nothing to share.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from engine.errors import ModelError
from engine.spec.schema import StepCacheSpec
from engine.stepcache.blocks import ACTIVE_PASS, BlockForward, BlockStack, route_blocks
from engine.stepcache.rules import Decision, FirstBlockBranch, MagCacheBranch, TeaCacheBranch, polynomial
from engine.stepcache.stats import StepCacheStats, opened

#: Sums over the local tensor -> sums over the whole tensor (an all-reduce across sequence-parallel ranks).
Reduce = Callable[[torch.Tensor], torch.Tensor]
#: MagCache's retention: this share of the first steps always runs (MagCache's and diffusers' default).
MAGCACHE_RETENTION = 0.2

T = TypeVar("T")


def identity(sums: torch.Tensor) -> torch.Tensor:
    return sums


@dataclass(frozen=True)
class TraceEntry:
    """One DiT pass: its step and branch, whether it was skipped, and the rule's numbers."""

    step: int
    branch: str
    skipped: bool
    measure: float | None
    accumulated: float | None
    seconds: float


@dataclass
class _Branch:
    """One guidance branch's state: its rule, and the tensors its next decision compares with."""

    rule: TeaCacheBranch | MagCacheBranch | FirstBlockBranch | None
    indicator: torch.Tensor | None = None  #: TeaCache: the previous pass's modulated input
    first_residual: torch.Tensor | None = None  #: first-block cache: the last computed pass's first-block residual
    residual: torch.Tensor | None = None  #: what the (rest of the) blocks added on the last computed pass
    residual_step: int | None = None


class StepCache:
    """The step cache of one stage run of one request."""

    def __init__(self, settings: StepCacheSpec | None, stack: BlockStack, reduce: Reduce = identity):
        self.settings = settings if settings is not None else StepCacheSpec(method="none")
        self.stack, self.reduce = stack, reduce
        self.branches: dict[str, _Branch] = {}
        self.trace: list[TraceEntry] = []
        self.stats = StepCacheStats(method=self.settings.method, threshold=self.settings.threshold)
        self._run_s = 0.0
        self._skipped_s = 0.0
        self._block_ids = frozenset(id(block) for block in stack.blocks)
        if self.settings.method == "fbcache" and len(stack.blocks) < 2:
            raise ModelError(f"fbcache skips the blocks after the first, and this transformer has {len(stack.blocks)}; "
                             "use teacache or magcache")
        if self.settings.active:
            route_blocks(stack)

    @classmethod
    def open(cls, settings: StepCacheSpec | None, stack: BlockStack, reduce: Reduce = identity) -> StepCache:
        """A fresh cache for one stage run, handed to the active :func:`collect` if any."""
        cache = cls(settings, stack, reduce)
        opened(cache)
        return cache

    def run(self, branch: str, step: int, steps: int, call: Callable[[], T]) -> T:
        """The transformer call ``call`` of ``branch`` (``cond``, ``uncond``...) at step ``step`` of ``steps``."""
        started = time.perf_counter()
        if not self.settings.active:
            result = call()
            self._count(False, time.perf_counter() - started)
            return result
        state = self.branches.get(branch)
        if state is None:
            state = self.branches[branch] = _Branch(self._rule(steps))
        active = Pass(self, state, step)
        token = ACTIVE_PASS.set(active)
        try:
            result = call()
        finally:
            ACTIVE_PASS.reset(token)
        if active.decision is None:
            raise ModelError("the transformer call ran none of the blocks the step cache routes (the family's "
                             f"{type(self.stack).__name__} names other blocks than the transformer runs)")
        seconds = time.perf_counter() - started
        self._count(active.decision.skip, seconds)
        self.trace.append(TraceEntry(step, branch, active.decision.skip, active.decision.measure,
                                     active.decision.accumulated, seconds))
        return result

    def routes(self, block: torch.nn.Module) -> bool:
        """Whether ``block`` is one of the blocks this cache routes (not another transformer's on the node)."""
        return id(block) in self._block_ids

    def _rule(self, steps: int) -> TeaCacheBranch | MagCacheBranch | FirstBlockBranch:
        threshold = self.settings.threshold
        if self.settings.method == "teacache":
            profile = self.stack.teacache
            rescale = polynomial(profile.coefficients) if profile.coefficients else float
            return TeaCacheBranch(threshold, rescale, profile.retention_steps)
        if self.settings.method == "magcache":
            return MagCacheBranch(threshold, max(1, int(MAGCACHE_RETENTION * steps + 0.5)))
        return FirstBlockBranch(threshold)

    def _count(self, skipped: bool, seconds: float) -> None:
        if skipped:
            self.stats.passes_skipped += 1
            self._skipped_s += seconds
        else:
            self.stats.passes_run += 1
            self._run_s += seconds
        # A skipped pass would have taken a computed pass's mean time; it took its own (embeddings, head, and the
        # first block or the indicator).
        mean_run_s = self._run_s / self.stats.passes_run if self.stats.passes_run else 0.0
        self.stats.seconds_saved = round(self.stats.passes_skipped * mean_run_s - self._skipped_s, 4)

    # -- measures over the whole tensor ---------------------------------------------------------------------------

    def relative_l1(self, current: torch.Tensor, previous: torch.Tensor) -> float:
        """sum |current - previous| / sum |previous| over the whole tensor."""
        sums = self.reduce(torch.stack([(current.float() - previous.float()).abs().sum(), previous.float().abs().sum()]))
        return float(sums[0] / sums[1])

    def magnitude_ratio(self, current: torch.Tensor, previous: torch.Tensor) -> float:
        """sum |current| / sum |previous| over the whole tensor."""
        sums = self.reduce(torch.stack([current.float().abs().sum(), previous.float().abs().sum()]))
        return float(sums[0] / sums[1])


@dataclass
class Pass:
    """One cached transformer call: what its blocks do, decided at the first block."""

    cache: StepCache
    state: _Branch
    step: int
    decision: Decision | None = None
    residual_from: torch.Tensor | None = field(default=None, repr=False)  #: the hidden state the residual adds to

    def owns(self, block: torch.nn.Module) -> bool:
        return self.cache.routes(block)

    def block(self, index: int, block: torch.nn.Module, original: BlockForward, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
        stack, state = self.cache.stack, self.state
        last = index == len(stack.blocks) - 1
        hidden = stack.hidden_in(args, kwargs)
        if index == 0:
            self.residual_from = hidden
            if not isinstance(state.rule, FirstBlockBranch):
                self.decision = self._decide_before(block, args, kwargs, hidden)
        if self.decision is not None and self.decision.skip:
            # Skipped: hand the hidden state on; the last block adds the branch's cached residual.
            return stack.with_hidden(args, kwargs, hidden + state.residual if last else hidden)

        output = original(*args, **kwargs)
        if self.decision is None:  # first-block cache: decided on the first block's residual
            output = self._decide_after_first(output, hidden, args, kwargs, last)
            if self.decision.skip:
                return output
        if last:
            self._computed(stack.hidden_out(output))
        return output

    def _can_skip(self, hidden: torch.Tensor) -> bool:
        return self.state.residual is not None and self.state.residual.shape == hidden.shape

    def _decide_before(self, block: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                       hidden: torch.Tensor) -> Decision:
        state = self.state
        if isinstance(state.rule, TeaCacheBranch):
            indicator = self.cache.stack.modulated_input(block, args, kwargs)
            comparable = state.indicator is not None and state.indicator.shape == indicator.shape
            distance = self.cache.relative_l1(indicator, state.indicator) if comparable else None
            state.indicator = indicator
            return state.rule.decide(self.step, distance if self._can_skip(hidden) else None)
        return state.rule.decide(self.step, self._can_skip(hidden))

    def _decide_after_first(self, output: Any, hidden: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any],
                            last: bool) -> Any:
        """First-block cache: compare the first block's residual with the last computed pass's; on a skip the first
        block's output goes on with the cached residual of the others added at the last block."""
        state, stack = self.state, self.cache.stack
        first_out = stack.hidden_out(output)
        first_residual = first_out - hidden
        comparable = state.first_residual is not None and state.first_residual.shape == first_residual.shape
        distance = self.cache.relative_l1(first_residual, state.first_residual) if comparable and self._can_skip(hidden) else None
        self.decision = state.rule.decide(distance)
        if self.decision.skip:
            return stack.with_hidden(args, kwargs, first_out + state.residual) if last else output
        state.first_residual = first_residual
        self.residual_from = first_out
        return output

    def _computed(self, out: torch.Tensor) -> None:
        """The last block ran: keep what the blocks added (MagCache: and how its magnitude changed)."""
        state = self.state
        residual = out - self.residual_from
        if isinstance(state.rule, MagCacheBranch) and state.residual is not None and state.residual_step == self.step - 1:
            state.rule.measured(self.cache.magnitude_ratio(residual, state.residual))
        state.residual, state.residual_step = residual, self.step
        self.residual_from = None
