"""From a manifest to a bus connection: the one place a node's broker settings (address,
chunking, keepalive, credentials, TLS, will and birth) are read from the manifest, for
services, the standby watcher and the operator's tools alike."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from fedbus import topics
from fedbus.bus import Bus, MqttOptions, Will
from fedbus.bus.memory import MemoryBroker, MemoryBus
from fedbus.bus.signed import SignedBus
from fedbus.codec import encode
from fedbus.credentials import node_credentials
from fedbus.errors import ManifestError
from fedbus.manifest import BrokerSpec, Manifest, NodeSpec
from fedbus.signing import Signer, Verifier
from fedbus.wire import presence

__all__ = ["BrokerSettings", "authenticated", "broker_settings", "keys_dir", "make_bus",
           "mqtt_bus"]


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """How one identity connects to the manifest's broker."""

    host: str
    port: int
    client_id: str
    options: MqttOptions


def broker_settings(m: Manifest, node_id: str, *, login_as: str | None = None,
                    client_id: str | None = None) -> BrokerSettings:
    """``node_id``'s connection to ``m``'s broker, logged in as ``login_as`` (default: the
    node itself; an operator watches with its own user)."""
    if m.broker is None:
        raise ManifestError(m.source, "broker",
                            "no broker given: use `fedbus run` (embedded broker) or add "
                            "broker: {host: ..., port: ...}")
    b = m.broker
    creds = node_credentials(m, login_as or node_id)
    if client_id is None:
        # A secured broker names the session after the user (use_username_as_clientid);
        # asking for that same id keeps our persistent session where the broker puts it.
        client_id = (creds.username if creds.username == (login_as or node_id)
                     else f"fedbus.{m.job}.{node_id}")
    options = MqttOptions(chunk_bytes=b.chunk_bytes,
                          max_message_bytes=m.codec.max_message_mb << 20,
                          keepalive=b.keepalive_s, username=creds.username,
                          password=creds.password, tls_ca=creds.tls_ca,
                          tls_cert=creds.tls_cert, tls_key=creds.tls_key,
                          connect_timeout_s=b.connect_timeout_s,
                          connect_wait_s=b.connect_wait_s, reconnect_max_s=b.reconnect_max_s)
    return BrokerSettings(host=b.host, port=b.port, client_id=client_id, options=options)


def mqtt_bus(node_id: str, s: BrokerSettings, *, will: Will | None = None,
             birth: Will | None = None) -> Bus:
    from fedbus.bus.mqtt import MqttBus  # aiomqtt only where MQTT is used

    return MqttBus(node_id, s.host, s.port, client_id=s.client_id, will=will, birth=birth,
                   options=s.options)


def make_bus(m: Manifest, node: NodeSpec, *, memory: MemoryBroker | None = None,
             interactive: bool = False) -> Bus:
    """A bus connection for ``node``, with its last will announcing it offline.
    ``interactive``: a command a person waits on (`fedbus watch`, `query`, the dashboard)
    gives up after one attempt's ``broker.connect_timeout_s``, not ``connect_wait_s``."""
    topic = topics.presence(m.job, node.id)
    will = Will(topic=topic, payload=encode(presence(m.job, node.id, node.role, "offline")),
                retain=True)
    # Published by the bus on every (re)connect: a node that lost its connection (and had its
    # will published) is announced online again as soon as it is back.
    birth = Will(topic=topic, payload=encode(presence(m.job, node.id, node.role, "online")),
                 retain=True)
    signing = _signing(m, node.id)
    if signing is not None:  # the will and the birth are published by the broker: signed now
        will = Will(will.topic, signing[0].sign(will.payload), will.retain)
        birth = Will(birth.topic, signing[0].sign(birth.payload), birth.retain)
    bus: Bus
    if memory is not None:
        chunk = (m.broker or BrokerSpec()).chunk_bytes
        bus = MemoryBus(memory, node.id, will=will, birth=birth,
                        client_id=f"fedbus.{m.job}.{node.id}", chunk_bytes=chunk)
    else:
        s = broker_settings(m, node.id)
        if interactive:
            s = replace(s, options=replace(s.options, connect_wait_s=None))
        bus = mqtt_bus(node.id, s, will=will, birth=birth)
    return bus if signing is None else SignedBus(bus, *signing)


def keys_dir(m: Manifest) -> Path:
    """Where the job's keys are (``security.keys``, relative to the manifest's folder)."""
    path = Path(m.security.keys)
    if not path.is_absolute() and m.source and not m.source.startswith("<"):
        path = Path(m.source).resolve().parent / path
    return path


def _signing(m: Manifest, node_id: str) -> tuple[Signer, Verifier] | None:
    """``node_id``'s signer and the job's verifier, when the job signs its messages."""
    if m.security.sign == "off":
        return None
    root = keys_dir(m)
    if not any(root.glob("*.pub")):
        raise ManifestError(m.source, "security.keys",
                            f"no public keys in {root}: make them with `fedbus keys "
                            f"{m.source} --out {root}`")
    # both follow their files: a rotated key is taken without a restart (docs/security.md)
    return (Signer.from_file(node_id, root / f"{node_id}.key"),
            Verifier.from_folder(root, required=m.security.sign == "required"))


def signed(m: Manifest, node_id: str, bus: Bus) -> Bus:
    """``bus``, signing as ``node_id`` and checking what it receives, when the job signs: for
    a connection that is not the node's own (a standby's watcher, a `fedbus run` that looks
    for its job on the broker), which must read the node's signed presence as the node would."""
    signing = _signing(m, node_id)
    return bus if signing is None else SignedBus(bus, *signing)


def authenticated(m: Manifest, bus: Bus) -> bool:
    """Does the broker tie what is published on a node's topics to that node? The in-process
    bus does (nothing else can publish on it); an MQTT broker does when nodes log in with
    credentials checked against an ACL (``fedbus acl``)."""
    if isinstance(bus, SignedBus):
        # every message is signed and checked against its sender's key
        return bus.verifier.required or authenticated(m, bus.inner)
    if isinstance(bus, MemoryBus):
        return True
    # A user name (given, or the node id by default once a password or certificate is
    # configured: fedbus.credentials) means the broker checked who we are.
    return node_credentials(m, bus.node_id).secured
