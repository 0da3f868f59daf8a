"""Message bus: the ``Bus`` protocol, an in-memory bus and an MQTT bus."""

from fedbus.bus._base import Bus, Message, Subscription, Will

__all__ = ["Bus", "Message", "Subscription", "Will"]
