"""The transformer's block stack, as step caching sees it, and the routing of its blocks through the active pass.

A diffusers transformer runs its blocks in a plain loop inside ``forward``. Step caching replaces each block's
``forward`` once, on the first cached run of that transformer, by one that looks up the pass active on the calling
thread (a context variable set by :meth:`StepCache.run <engine.stepcache.cache.StepCache.run>` for the length of one
transformer call) and calls the original when there is none: a run without caching, or another node's stage on the
same module, executes exactly the original code. Two requests computing on two threads each see their own pass.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from engine.stepcache.cache import Pass

#: The pass of the transformer call running on this thread, if it is cached.
ACTIVE_PASS: ContextVar[Pass | None] = ContextVar("step_cache_pass", default=None)

BlockForward = Callable[..., Any]
_ROUTING = threading.Lock()


@dataclass(frozen=True)
class TeaCacheProfile:
    """What TeaCache needs of a model: the polynomial rescaling the relative L1 change of its modulated input to
    the change of its output (``None``: no published fit, the change is used as measured), and how many first
    steps always run (the fit's own retention)."""

    coefficients: tuple[float, ...] | None = None
    retention_steps: int = 1


class BlockStack(ABC):
    """A transformer's main block stack: how a block takes and returns the hidden state, and what TeaCache watches.

    Families subclass it in ``nodes/<family>/stepcache.py``; the engine never looks inside a block otherwise.
    """

    def __init__(self, blocks: Sequence[torch.nn.Module], teacache: TeaCacheProfile):
        if not blocks:
            raise ValueError("step caching needs a transformer with at least one block")
        self.blocks, self.teacache = blocks, teacache

    @abstractmethod
    def hidden_in(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """The hidden state a block call receives."""

    @abstractmethod
    def hidden_out(self, output: Any) -> torch.Tensor:
        """The hidden state a block call returns."""

    @abstractmethod
    def with_hidden(self, args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> Any:
        """What a block called with ``args, kwargs`` returns when it is skipped and hands on ``hidden`` (any other
        stream it carries, as it came in)."""

    @abstractmethod
    def modulated_input(self, block: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """TeaCache's indicator, computed from the first block's call: its timestep-modulated input."""


def route_blocks(stack: BlockStack) -> None:
    """Route every block of ``stack`` through the active pass (once per block, under a lock: two requests starting
    together on one transformer must not wrap a block twice)."""
    with _ROUTING:
        for index, block in enumerate(stack.blocks):
            if "_step_cache_original" in block.__dict__:
                continue
            original = block.forward

            def forward(*args: Any, _block=block, _index: int = index, _original: BlockForward = original,
                        **kwargs: Any) -> Any:
                active = ACTIVE_PASS.get()
                if active is None or not active.owns(_block):
                    return _original(*args, **kwargs)
                return active.block(_index, _block, _original, args, kwargs)

            block.__dict__["_step_cache_original"] = original
            block.forward = forward
