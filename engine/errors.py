"""The engine's exception tree.

Every error a user can cause or meet derives from :class:`EngineError`; the CLI prints those as one clear
message (no traceback) and exits 1. Errors from libraries (Mooncake return codes, MQTT exceptions, diffusers
loading errors) are translated at the boundary into one of these, raised ``from`` the original.

    EngineError
    ├── SpecError          the graph file is wrong (carries every problem found, each with file:line field)
    ├── PlanError          the graph is well-formed but cannot be placed (memory, devices, model files)
    ├── RequestError       a request's values are not ones the model can take
    ├── ModelError         model weights or configs cannot be found or loaded
    ├── OutputError        the run's output folder cannot be created or written
    ├── TransportError     an edge transfer failed (names the edge and the request)
    │   ├── IntegrityError a payload failed its digest check after every retransmission
    │   ├── EdgeTimeout    a transfer or a grant did not complete in time
    │   └── PeerDead       the other side of an edge is gone
    ├── ControlError       the broker cannot be reached or a control message is invalid
    │   └── BrokerLost     the broker was gone longer than timeouts.broker_s
    └── NodeError          a node replica failed, died or stopped making progress

:class:`Interrupted` is not an error: the user stopped the command, and the CLI exits 130.
"""

from __future__ import annotations

from dataclasses import dataclass


class EngineError(Exception):
    """Base of every error the engine reports to a user."""


class Interrupted(Exception):
    """The user stopped the command (Ctrl-C, SIGTERM): every worker was stopped; not an error, exit status 130."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a graph file: where it is and what would be valid."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where} {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class SpecError(EngineError):
    """The graph file is invalid. ``problems`` lists everything found, in file order."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(problems, key=lambda p: (p.file, p.line or 0, p.field))
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the graph:"
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))


class PlanError(EngineError):
    """The graph is valid but cannot be placed as declared."""


class RequestError(EngineError):
    """A request carries values the model cannot take."""


class ModelError(EngineError):
    """Model weights or configs cannot be found or loaded."""


class OutputError(EngineError):
    """The run's output folder cannot be created, or a file cannot be written in it."""


class TransportError(EngineError):
    """An edge transfer failed. ``detail`` is the message without the edge and request in front."""

    def __init__(self, message: str, *, edge: str | None = None, request_id: str | None = None):
        self.detail = message
        self.edge = edge
        self.request_id = request_id
        context = ", ".join(
            part for part in (f"edge {edge!r}" if edge else "", f"request {request_id}" if request_id else "") if part
        )
        super().__init__(f"{context}: {message}" if context else message)


class IntegrityError(TransportError):
    """A payload failed verification after every allowed retransmission."""


class EdgeTimeout(TransportError):
    """A transfer, a slot grant or an acknowledgement did not arrive in time."""


class PeerDead(TransportError):
    """The peer of an edge is not reachable any more."""


class ControlError(EngineError):
    """The control plane (MQTT broker or a control message) failed."""


class BrokerLost(ControlError):
    """The broker was unreachable for longer than the run allows (timeouts.broker_s)."""


class BrokerUnreachable(ControlError):
    """No broker answered at the address (as opposed to one that refused the credentials)."""


class NodeError(EngineError):
    """A node replica failed to load, died, or stopped making progress."""

    def __init__(self, message: str, *, node: str | None = None, replica: int | None = None, stage: str | None = None):
        self.node = node
        self.replica = replica
        self.stage = stage
        where = ""
        if node is not None:
            where = f"node {node!r}" + (f" replica {replica}" if replica is not None else "")
            where += f" stage {stage!r}" if stage else ""
        super().__init__(f"{where}: {message}" if where else message)
