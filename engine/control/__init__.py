"""The MQTT control plane: typed messages, topic layout, broker addresses and the embedded broker, a client
with reconnect, its in-memory twin (:mod:`engine.control.memory`), and heartbeat-based liveness. Message models
live in :mod:`engine.control.messages`."""

from engine.control.broker import BrokerAddress, EmbeddedBroker, TLSOptions, embedded_broker, parse_broker
from engine.control.bus import ControlBus, Inbound, LastWill
from engine.control.client import ControlClient
from engine.control.heartbeat import LivenessMonitor, Progress, Trouble, publish_heartbeats
from engine.control.messages import Message, decode, encode
from engine.control.topics import Topics

__all__ = [
    "BrokerAddress",
    "ControlBus",
    "ControlClient",
    "EmbeddedBroker",
    "Inbound",
    "LastWill",
    "LivenessMonitor",
    "Message",
    "Progress",
    "TLSOptions",
    "Topics",
    "Trouble",
    "decode",
    "embedded_broker",
    "encode",
    "parse_broker",
    "publish_heartbeats",
]
