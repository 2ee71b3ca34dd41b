"""Who may speak on a run's control plane, and as whom.

Every run has a fresh signing key (:mod:`engine.control.signing`): the controller and each worker sign what they
send with it and drop whatever is not signed with it. On the embedded broker each process also has its own
broker user (named as its client id, with a fresh password) confined by the broker's ACL to its topics. On a
broker of the user's own (``mqtt://user:pass@host``) every process connects with the URL's credentials.
Workers get their password and the key on standard input (:class:`engine.worker.contract.WorkerSecrets`);
nothing of this is written to disk by the engine, and it dies with the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from engine.control.broker import BrokerAddress, BrokerUser
from engine.control.signing import new_key
from engine.control.topics import Topics
from engine.plan.model import Plan
from engine.worker.contract import WorkerSecrets


@dataclass(frozen=True)
class RunAccess:
    topics: Topics
    key: bytes = dataclasses.field(repr=False)
    users: dict[str, BrokerUser]  #: client id -> its broker user; empty on a broker of the user's own

    @classmethod
    def for_run(cls, topics: Topics, plan: Plan, *, embedded: bool, key: bytes | None = None) -> RunAccess:
        """Fresh users on an embedded broker; the run's key is ``key`` (derived for runs with agents) or fresh."""
        users: dict[str, BrokerUser] = {}
        if embedded:
            users[topics.controller_client] = BrokerUser.generate(topics.controller_client, topics.controller_acl)
            for node in plan.nodes.values():
                for replica in range(node.most_replicas):  # an elastic node's later replicas too
                    client = topics.replica_client(node.name, replica)
                    users[client] = BrokerUser.generate(client, topics.replica_acl(node.name, replica))
        return cls(topics, key or new_key(), users)

    def address(self, broker: BrokerAddress, client_id: str) -> BrokerAddress:
        """Where ``client_id`` connects, with its credentials."""
        user = self.users.get(client_id)
        return broker.as_user(user) if user is not None else broker

    def worker_broker(self, broker: BrokerAddress, node: str, replica: int) -> dict[str, Any]:
        """A worker's broker address for its spec file: everything but the password."""
        return {**dataclasses.asdict(self.address(broker, self.topics.replica_client(node, replica))), "password": None}

    def worker_secrets(self, broker: BrokerAddress, node: str, replica: int) -> WorkerSecrets:
        address = self.address(broker, self.topics.replica_client(node, replica))
        return WorkerSecrets(broker_password=address.password, run_key=self.key.hex())
