"""The MQTT topic layout of one run, in one place.

    <prefix>/<run_id>/status/<node>/<replica>   retained Status of a replica (also its last will)
    <prefix>/<run_id>/hb/<node>/<replica>       Heartbeat of a replica
    <prefix>/<run_id>/in/<node>/<replica>       a replica's inbox: run_stage, edge messages, shutdown
    <prefix>/<run_id>/ctl                       the controller's inbox: stage_done, stage_failed, preview

The run id namespaces everything, so concurrent runs on one broker never see each other's messages. Each
process connects with its own client id (``<run_id>-controller``, ``<run_id>-<node>-<replica>``), which is also
the sender named in its signed messages and, on the embedded broker, its user name; :meth:`Topics.replica_acl`
says which topics a replica may read and write.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.control.messages import Message
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

    @property
    def controller_client(self) -> str:
        return f"{self.run_id}-controller"

    def replica_client(self, node: str, replica: int) -> str:
        return f"{self.run_id}-{_check_level('node name', node)}-{replica}"

    def signer_of(self, message: Message) -> str:
        """The client id that must have signed ``message``: the replica it says it comes from, else the controller."""
        claim = claims_to_be(message)
        return self.controller_client if claim is None else self.replica_client(*claim)

    def replica_acl(self, node: str, replica: int) -> Acl:
        """What a replica may do: read its inbox and every status; write its status and heartbeats, the
        controller's inbox and other replicas' inboxes (edge messages)."""
        return Acl(read=(self.inbox(node, replica), self.all_status),
                   write=(self.status(node, replica), self.heartbeat(node, replica), self.controller, f"{self.root}/in/+/+"))

    @property
    def controller_acl(self) -> Acl:
        return Acl(read=(f"{self.root}/#",), write=(f"{self.root}/#",))


def claims_to_be(message: Message) -> tuple[str, int] | None:
    """The replica a message says it comes from (its node and replica, or its sender / receiver), if any."""
    if message.kind in ("status", "heartbeat", "stage_done", "stage_failed", "preview"):
        return (message.node, message.replica)  # type: ignore[union-attr]
    ref = getattr(message, "sender", None) or getattr(message, "receiver", None)
    return None if ref is None else (ref.node, ref.replica)


@dataclass(frozen=True)
class Acl:
    """Topic filters one broker user may subscribe to (read) and publish to (write)."""

    read: tuple[str, ...]
    write: tuple[str, ...]


@dataclass(frozen=True)
class AgentTopics:
    """Topics of the agents on a broker (not of one run), and who signs what there.

        <prefix>/agents/<agent>/birth    retained AgentBirth (its last will says offline)
        <prefix>/agents/<agent>/orders   AgentOrder from a run's controller
        <prefix>/<run_id>/jobs           AgentJob: an agent's answers to that run's controller
    """

    prefix: str = "dge"

    def birth(self, agent: str) -> str:
        return f"{self.prefix}/agents/{_check_level('agent name', agent)}/birth"

    @property
    def all_births(self) -> str:
        return f"{self.prefix}/agents/+/birth"

    def orders(self, agent: str) -> str:
        return f"{self.prefix}/agents/{_check_level('agent name', agent)}/orders"

    def jobs(self, run_id: str) -> str:
        return f"{self.prefix}/{_check_level('run id', run_id)}/jobs"

    @staticmethod
    def agent_client(agent: str) -> str:
        return f"agent-{agent}"

    @staticmethod
    def deployer_client(run_id: str) -> str:
        return f"{run_id}-deployer"

    def agent_acl(self, agent: str) -> Acl:
        """What an agent with a broker user of its own may do: read its orders; announce itself, and answer any
        run's controller (its workers get users of their own, per run)."""
        return Acl(read=(self.orders(agent),), write=(self.birth(agent), f"{self.prefix}/+/jobs"))

    def deployer_acl(self, run_id: str) -> Acl:
        """What a run's deployer may do: order any agent, read the agents' births and its run's job reports."""
        return Acl(read=(self.all_births, self.jobs(run_id)), write=(f"{self.prefix}/agents/+/orders",))

    def signer_of(self, message: Message) -> str | None:
        """The client id that must have signed an agent message; None for any other message."""
        if message.kind in ("agent_birth", "agent_job"):
            return self.agent_client(message.agent)  # type: ignore[union-attr]
        if message.kind == "agent_order":
            return self.deployer_client(message.run_id)  # type: ignore[union-attr]
        return None


@dataclass(frozen=True)
class ServiceTopics:
    """Topics of a service (``engine serve``) taking jobs over MQTT.

        <prefix>/serve/<service>/submit               SubmitJob from clients
        <prefix>/serve/<service>/reply/<client_id>    JobUpdate to the client that submitted
    """

    service: str
    prefix: str = "dge"

    def __post_init__(self) -> None:
        _check_level("service name", self.service)

    @property
    def root(self) -> str:
        return f"{self.prefix}/serve/{self.service}"

    @property
    def submit(self) -> str:
        return f"{self.root}/submit"

    def reply(self, client_id: str) -> str:
        return f"{self.root}/reply/{_check_level('client id', client_id)}"

    @property
    def service_client(self) -> str:
        return f"{self.service}-service"

    def client_acl(self, client_id: str) -> Acl:
        """What a submitting client may do: publish jobs, read its own replies."""
        return Acl(read=(self.reply(client_id),), write=(self.submit,))

    @property
    def service_acl(self) -> Acl:
        return Acl(read=(self.submit,), write=(f"{self.root}/reply/+",))
