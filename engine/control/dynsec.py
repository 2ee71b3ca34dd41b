"""Broker identities made while a standing broker runs: mosquitto's dynamic security plugin.

A standing broker (``engine broker``) keeps its users in the plugin's JSON file: at first an administrator (the
engine's own user, which runs and services connect as), then one identity per agent (``engine agents add``) and,
while a run lasts, one per worker an agent starts for it. Every identity but the administrator is pinned to one
client id (the plugin refuses a connection under any other), so no credentials can take another client's place;
its role lets it subscribe and publish exactly its topics (:class:`~engine.control.topics.Acl`).

:class:`Identities` sends the plugin's commands (``$CONTROL/dynamic-security/v1``, plain JSON: the plugin reads no
signed message) as the administrator and waits for the answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
from collections.abc import Sequence
from typing import Any

import aiomqtt

from engine.control.broker import BrokerAddress
from engine.control.topics import Acl, Topics
from engine.errors import ControlError

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
ADMIN_ROLE = "engine-admin"
ANSWER_TIMEOUT_S = 5.0
_SALT_BYTES = 12
_ROUNDS = 101


def role_acls(acl: Acl) -> list[dict[str, Any]]:
    """The plugin's ACL entries for an :class:`Acl`: subscribe to its read filters, publish to its write ones."""
    return ([{"acltype": "subscribePattern", "topic": topic, "allow": True} for topic in acl.read]
            + [{"acltype": "publishClientSend", "topic": topic, "allow": True} for topic in acl.write])


def initial_config(admin: str, password: str, prefix: str) -> dict[str, Any]:
    """The plugin's file for a new broker: only ``admin``, who may use the engine's topics and the plugin's own.
    Anything not allowed is refused (publishing, subscribing); receiving what one may subscribe to is allowed."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ROUNDS)
    control = "$CONTROL/dynamic-security/#"
    return {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True, "subscribe": False,
                             "unsubscribe": True},
        "clients": [{"username": admin, "textname": "the engine's runs and services",
                     "password": base64.b64encode(digest).decode(), "salt": base64.b64encode(salt).decode(),
                     "iterations": _ROUNDS, "roles": [{"rolename": ADMIN_ROLE}]}],
        "groups": [],
        # A $ topic is not covered by the defaults: receiving the plugin's answers needs a rule of its own.
        "roles": [{"rolename": ADMIN_ROLE, "acls": [
            {"acltype": "publishClientSend", "topic": control, "allow": True},
            {"acltype": "publishClientReceive", "topic": control, "allow": True},
            {"acltype": "subscribePattern", "topic": control, "allow": True},
            *role_acls(Acl(read=(f"{prefix}/#",), write=(f"{prefix}/#",)))]}],
    }


def identity_commands(user: str, password: str, client_id: str, acl: Acl) -> list[dict[str, Any]]:
    """Commands making ``user`` (pinned to ``client_id``) with a role of its own named as it."""
    return [{"command": "createRole", "rolename": user, "acls": role_acls(acl)},
            {"command": "createClient", "username": user, "password": password, "clientid": client_id,
             "roles": [{"rolename": user}]}]


def removal_commands(user: str) -> list[dict[str, Any]]:
    return [{"command": "deleteClient", "username": user}, {"command": "deleteRole", "rolename": user}]


class Identities:
    """The administrator's connection to the plugin; ``async with Identities(admin, client_id) as identities``."""

    def __init__(self, admin: BrokerAddress, client_id: str):
        self.admin = admin
        self.client_id = client_id
        self._client: aiomqtt.Client | None = None

    async def __aenter__(self) -> Identities:
        from engine.control.client import mqtt_connection  # the engine's client settings (TLS, no Nagle)

        self._client = mqtt_connection(self.admin, self.client_id)
        try:
            await self._client.__aenter__()
            await self._client.subscribe(RESPONSE_TOPIC, qos=1)
        except aiomqtt.MqttError as exc:
            raise ControlError(f"broker {self.admin.display}: cannot manage its users as {self.admin.username!r}: "
                               f"{exc}") from exc
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        client, self._client = self._client, None
        if client is not None:  # a broker gone meanwhile does not hold up the goodbye
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)

    async def run(self, commands: Sequence[dict[str, Any]], *, absent_ok: bool = False) -> None:
        """Send ``commands`` and wait for the answers; ControlError naming the first that failed (one deleting what
        is not there counts as done with ``absent_ok``)."""
        assert self._client is not None, "use Identities in `async with`"
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                await self._client.publish(CONTROL_TOPIC, json.dumps({"commands": list(commands)}), qos=1)
                async for message in self._client.messages:
                    answer = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                    break
        except aiomqtt.MqttError as exc:
            raise ControlError(f"broker {self.admin.display}: managing its users failed: {exc}") from exc
        except TimeoutError:
            raise ControlError(
                f"broker {self.admin.display} did not answer as mosquitto's dynamic security does within "
                f"{ANSWER_TIMEOUT_S:g} s: per-agent identities need `engine broker` and its administrator "
                f"({self.admin.username!r} may not be it)") from None
        for sent, got in zip(commands, answer.get("responses", []), strict=False):
            error = got.get("error")
            if error and not (absent_ok and "not found" in error.lower()):
                raise ControlError(f"broker {self.admin.display}: {sent['command']} "
                                   f"{sent.get('username') or sent.get('rolename')!r}: {error}")


class RunWorkerUsers:
    """Broker users of one run's workers on agents whose users are their own, each pinned to its worker's client id
    and confined to what a replica does (:meth:`Topics.replica_acl`); made when their orders go out, removed when the
    run ends. (A controller killed outright leaves them behind: unused, as their run is over.)"""

    def __init__(self, admin: BrokerAddress, topics: Topics):
        self.admin = admin
        self.topics = topics
        self._identities: Identities | None = None
        self._made: list[str] = []

    async def make(self, node: str, replica: int) -> tuple[str, str]:
        """A user for ``node`` replica ``replica``: its name (the worker's client id) and password."""
        if self._identities is None:
            identities = Identities(self.admin, f"{self.topics.run_id}-users")
            await identities.__aenter__()
            self._identities = identities
        user, password = self.topics.replica_client(node, replica), secrets.token_urlsafe(24)
        if user in self._made:  # a replica started again: a fresh password for its new process
            await self._identities.run(removal_commands(user), absent_ok=True)
            self._made.remove(user)
        await self._identities.run(identity_commands(user, password, user, self.topics.replica_acl(node, replica)))
        self._made.append(user)
        return user, password

    async def remove_all(self) -> None:
        identities, self._identities = self._identities, None
        if identities is None:
            return
        try:
            await identities.run([command for user in self._made for command in removal_commands(user)], absent_ok=True)
            self._made.clear()
        finally:
            await identities.__aexit__(None, None, None)
