"""Message bus: the ``Bus`` protocol, an in-memory bus and (``fedbus.bus.mqtt``, imported
only where MQTT is used: aiomqtt and paho cost a node ~5 MiB) an MQTT bus."""

from fedbus.bus._base import Admit, Bus, Message, Screen, Subscription, Will
from fedbus.bus._chunking import ChunkLimits
from fedbus.bus.memory import MemoryBroker, MemoryBus
from fedbus.bus.options import MqttOptions

__all__ = [
    "Admit",
    "Bus",
    "ChunkLimits",
    "MemoryBroker",
    "MemoryBus",
    "Message",
    "MqttOptions",
    "Screen",
    "Subscription",
    "Will",
]
