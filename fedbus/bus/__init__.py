"""Message bus: the ``Bus`` protocol, an in-memory bus and an MQTT bus."""

from fedbus.bus._base import Admit, Bus, Message, Subscription, Will
from fedbus.bus._chunking import ChunkLimits
from fedbus.bus.memory import MemoryBroker, MemoryBus
from fedbus.bus.mqtt import MqttBus

__all__ = [
    "Admit",
    "Bus",
    "ChunkLimits",
    "MemoryBroker",
    "MemoryBus",
    "Message",
    "MqttBus",
    "Subscription",
    "Will",
]
