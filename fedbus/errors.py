"""The one exception tree of fedbus: a root and flat subclasses that carry data.

Messages say what was wrong, where, and what to do about it.
"""

from __future__ import annotations


class FedbusError(Exception):
    """Root of every error fedbus raises on purpose."""


class CodecError(FedbusError):
    """A payload could not be encoded or was rejected on decode.

    ``reason`` is a short machine-friendly tag (``"bad_magic"``, ``"too_large"``, ...) used as
    the label of the rejection counters; the message says what was wrong for people.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ManifestError(FedbusError):
    """A manifest is invalid. Names the file, the field and what is allowed."""

    def __init__(self, path: str, field: str, problem: str) -> None:
        super().__init__(f"{path}: {field}: {problem}")
        self.path = path
        self.field = field
        self.problem = problem


class BusError(FedbusError):
    """The message bus failed (connection lost for good, closed bus, bad topic)."""


class ConnectError(BusError):
    """Could not reach the broker at ``endpoint`` after the allowed attempts."""

    def __init__(self, endpoint: str, cause: str) -> None:
        super().__init__(f"cannot connect to MQTT broker at {endpoint}: {cause}")
        self.endpoint = endpoint
        self.cause = cause


class BrokerLimitError(BusError):
    """The broker's limits and fedbus's settings do not fit together (a packet limit below
    the chunk size, a queue too short for a model's chunks): refused at start, because at
    run time the same mismatch is a reconnect loop or silent loss. ``setting`` names what to
    change."""

    def __init__(self, problem: str, setting: str) -> None:
        super().__init__(f"{problem}; change {setting}")
        self.problem = problem
        self.setting = setting


class UpdateRejected(FedbusError):
    """An update was well-formed on the wire but unfit to aggregate (shape, dtype, NaN, stale)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TaskError(FedbusError):
    """The user's task (model + data) could not be loaded or failed."""


class BrokerError(FedbusError):
    """A local MQTT broker (mosquitto) could not be found or started. ``fix`` says what to do."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; fix: {fix}")
        self.problem = problem
        self.fix = fix


class PublishDenied(BusError):
    """The broker refused a publish: MQTT 5 PUBACK reason ``code`` >= 0x80 (0x87: not authorized).

    Raised to the publisher, because a refused message would otherwise vanish: with QoS 1 the
    broker still acknowledges it, only the reason code says it was dropped.
    """

    def __init__(self, node: str, topic: str, code: int, reason: str) -> None:
        super().__init__(
            f"broker refused publish by {node} to {topic!r}: {reason} (0x{code:02X}); "
            "check the broker ACL for this node (fedbus acl regenerates it from the manifest)"
        )
        self.node = node
        self.topic = topic
        self.code = code
        self.reason = reason


class SubscribeDenied(BusError):
    """The broker refused a subscription: SUBACK reason ``code`` >= 0x80."""

    def __init__(self, node: str, topic_filter: str, code: int, reason: str,
                 fix: str = "check the broker ACL for this node") -> None:
        super().__init__(
            f"broker refused subscription by {node} to {topic_filter!r}: {reason} "
            f"(0x{code:02X}); {fix}"
        )
        self.node = node
        self.topic_filter = topic_filter
        self.code = code
        self.reason = reason


class DeployError(FedbusError):
    """Deployment files (ACL, passwords, certificates, compose, units) could not be made."""
