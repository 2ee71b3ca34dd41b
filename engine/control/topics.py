"""The MQTT topic layout of one run, in one place.

    <prefix>/<run_id>/status/<node>/<replica>   retained Status of a replica (also its last will)
    <prefix>/<run_id>/hb/<node>/<replica>       Heartbeat of a replica
    <prefix>/<run_id>/in/<node>/<replica>       a replica's inbox: run_stage, edge messages, shutdown
    <prefix>/<run_id>/ctl                       the controller's inbox: stage_done, stage_failed

The run id namespaces everything, so concurrent runs on one broker never see each other's messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ControlError

_FORBIDDEN = ("/", "+", "#", "\0")


def _check_level(what: str, value: str) -> str:
    if not value or any(char in value for char in _FORBIDDEN):
        raise ControlError(f"{what} {value!r} cannot be an MQTT topic level: it must be non-empty without / + # or NUL")
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names and subscription filters for one run on one broker."""

    run_id: str
    prefix: str = "dge"

    def __post_init__(self) -> None:
        _check_level("topic prefix", self.prefix)
        _check_level("run id", self.run_id)

    @property
    def root(self) -> str:
        return f"{self.prefix}/{self.run_id}"

    def _replica(self, section: str, node: str, replica: int) -> str:
        if replica < 0:
            raise ControlError(f"replica index must be >= 0, got {replica}")
        return f"{self.root}/{section}/{_check_level('node name', node)}/{replica}"

    def status(self, node: str, replica: int) -> str:
        return self._replica("status", node, replica)

    def heartbeat(self, node: str, replica: int) -> str:
        return self._replica("hb", node, replica)

    def inbox(self, node: str, replica: int) -> str:
        return self._replica("in", node, replica)

    @property
    def controller(self) -> str:
        return f"{self.root}/ctl"

    @property
    def all_status(self) -> str:
        """Filter matching every replica's status topic."""
        return f"{self.root}/status/+/+"

    @property
    def all_heartbeats(self) -> str:
        """Filter matching every replica's heartbeat topic."""
        return f"{self.root}/hb/+/+"
