"""What a stage's backends did for one request: the chain walked, with reasons, and what the one used cost."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.backends.cache import Parity
from engine.backends.names import Reason


@dataclass
class Meter:
    """Filled by the backend that runs a request's stage."""

    cache: str | None = None  #: resident, hit, built, rebuilt (stale: ...); None without artifacts
    shapes: str | None = None  #: the artifact's: static (this size only), or the range a dynamic one serves
    build_s: float = 0.0
    load_s: float = 0.0
    run_ms: float = 0.0
    parity: Parity | None = None


@dataclass(frozen=True)
class Step:
    backend: str
    reason: Reason | None  #: why it did not run the stage; None: it ran it
    detail: str = ""


@dataclass
class StageUse:
    asked: str
    used: str
    chain: list[Step] = field(default_factory=list)
    meter: Meter = field(default_factory=Meter)
    versions: dict[str, str] = field(default_factory=dict)
