"""The secrets of one cluster deployment, made when it is rendered: keys, broker users, their ACLs.

Each pod connects to the broker as its own user: the serving head as ``head`` (its controller, its local workers
and the agents' deployer all share it, so it may use every topic under the engine's prefix), each agent as its
Deployment's name, confined to what an agent and its node's workers do. The serving head makes a run id at each
start, so an agent's ACL names its node's topics in every run (``dge/+/...``), built from the engine's own topic
layout (:mod:`engine.control.topics`) rather than spelled out again here.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.control.broker import BrokerUser, mosquitto_acl, mosquitto_password_line
from engine.control.signing import KEY_BYTES
from engine.control.topics import Acl, AgentTopics, Topics
from engine.deploy.pods import Pod

HEAD_USER = "head"
_RUN = "run"  #: a run id standing for every run in the ACLs


@dataclass(frozen=True)
class Credentials:
    deploy_key: str = field(repr=False)  #: hex, shared by the serving head and the agents (ENGINE_DEPLOY_KEY)
    api_token: str = field(repr=False)  #: the serving head's API token (ENGINE_API_TOKEN)
    users: dict[str, BrokerUser]  #: pod name -> its broker user

    @classmethod
    def generate(cls, pods: Iterable[Pod], replicas: dict[str, int]) -> Credentials:
        """Fresh keys and a broker user per pod; ``replicas``: node -> its worker count."""
        prefix = AgentTopics().prefix
        users = {}
        for pod in pods:
            if pod.is_head:
                users[pod.name] = BrokerUser.generate(HEAD_USER, Acl(read=(f"{prefix}/#",), write=(f"{prefix}/#",)))
            else:
                users[pod.name] = BrokerUser.generate(pod.name, agent_acl(pod, replicas))
        return cls(secrets.token_hex(KEY_BYTES), secrets.token_urlsafe(32), users)

    def password_file(self) -> str:
        """mosquitto's password file (PBKDF2-SHA512 hashes, as mosquitto_passwd writes them)."""
        return "".join(mosquitto_password_line(user.name, user.password) for user in self.users.values())

    def acl_file(self) -> str:
        return mosquitto_acl(list(self.users.values()))


def agent_acl(pod: Pod, replicas: dict[str, int]) -> Acl:
    """An agent's topics (its orders, its birth, every run's jobs) and those of its nodes' workers in every run."""
    agents, run = AgentTopics(), Topics(_RUN)
    read, write = [agents.orders(pod.name)], [agents.birth(pod.name), agents.jobs(_RUN)]
    for node in pod.nodes:
        for replica in range(replicas[node]):
            acl = run.replica_acl(node, replica)
            read += acl.read
            write += acl.write
    return Acl(read=_every_run(read, run), write=_every_run(write, run))


def _every_run(topics: list[str], run: Topics) -> tuple[str, ...]:
    """The filters with the run's level as ``+``, each once, in order."""
    root = f"{run.root}/"
    return tuple(dict.fromkeys(f"{run.prefix}/+/{t.removeprefix(root)}" if t.startswith(root) else t for t in topics))
