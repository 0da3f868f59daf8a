"""The ``broker:`` and ``brokers:`` sections: where nodes connect and how they log in (password
source, TLS, mTLS), and a tree of bridged brokers with each node's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from fedbus.manifest._yaml import VAR_NAME
from fedbus.manifest.model import BrokerNode, BrokerSpec, NodeSpec
from fedbus.manifest.parse.reader import Reader, field_names, kind

__all__ = ["node_brokers", "parse_broker", "parse_brokers", "root_spec"]


_MQTT_MAX_PACKET: Final = 268_435_455


def parse_broker(read: Reader, value: Any, field: str = "broker") -> BrokerSpec:
    t = read.table(value, field, field_names(BrokerSpec))
    d = BrokerSpec()
    password_env = read.opt_string(t.get("password_env"), f"{field}.password_env")
    if password_env is not None and not VAR_NAME.match(password_env):
        read.fail(f"{field}.password_env",
                  f"{password_env!r} is not an environment variable name; name the variable "
                  "that holds the password (e.g. FEDBUS_BROKER_PASSWORD), not the password")
    host = read.string(t.get("host", d.host), f"{field}.host")
    if any(c.isspace() or c in "/" for c in host):
        read.fail(f"{field}.host", f"{host!r} is not a host name or address")
    tls_cert = read.opt_string(t.get("tls_cert"), f"{field}.tls_cert")
    tls_key = read.opt_string(t.get("tls_key"), f"{field}.tls_key")
    if (tls_cert is None) != (tls_key is None):
        read.fail(f"{field}.tls_cert" if tls_cert is None else f"{field}.tls_key",
                  "tls_cert and tls_key go together: set both (client certificate and its "
                  "key, e.g. from `fedbus certs`) or neither")
    return BrokerSpec(
        host=host,
        port=read.integer(t.get("port", d.port), f"{field}.port", lo=1, hi=65535),
        username=read.opt_string(t.get("username"), f"{field}.username"),
        password_env=password_env,
        password_file=read.opt_string(t.get("password_file"), f"{field}.password_file"),
        tls_ca=read.opt_string(t.get("tls_ca"), f"{field}.tls_ca"),
        tls_cert=tls_cert,
        tls_key=tls_key,
        chunk_bytes=read.integer(t.get("chunk_bytes", d.chunk_bytes), f"{field}.chunk_bytes",
                                 lo=1024, hi=_MQTT_MAX_PACKET - 65536),
        keepalive_s=read.integer(t.get("keepalive_s", d.keepalive_s), f"{field}.keepalive_s",
                                 lo=1, hi=65535),
        max_queued_messages=read.integer(
            t.get("max_queued_messages", d.max_queued_messages),
            f"{field}.max_queued_messages", lo=1),
        connect_timeout_s=_seconds(read, t, d, field, "connect_timeout_s"),
        connect_wait_s=_seconds(read, t, d, field, "connect_wait_s"),
        reconnect_max_s=_seconds(read, t, d, field, "reconnect_max_s"),
    )


def _seconds(read: Reader, t: Mapping[str, Any], d: BrokerSpec, field: str, key: str) -> float:
    """A positive number of seconds, at most a day (a longer wait is a mistake, not a plan)."""
    return read.number(t.get(key, getattr(d, key)), f"{field}.{key}",
                       lambda v: 0 < v <= 86_400, "seconds, > 0 and at most 86400")


def parse_brokers(read: Reader, value: Any) -> Mapping[str, BrokerNode]:
    """``brokers: {NAME: {parent: NAME, host, port, ...broker keys}}``: a tree of brokers,
    each bridged to its parent's; exactly one (the root) has no parent. A broker without
    host and port is started by ``fedbus run``."""
    if not isinstance(value, dict) or not value:
        read.fail("brokers", "expected a mapping of broker names to {parent, host, port, "
                             f"...}}, got {kind(value)}")
    out: dict[str, BrokerNode] = {}
    for key, raw in value.items():
        name = read.ident(key, "brokers")
        f = f"brokers.{name}"
        t = read.table({} if raw is None else raw, f, ("parent", *field_names(BrokerSpec)))
        parent = None if t.get("parent") is None else read.ident(t["parent"], f"{f}.parent")
        spec_keys = {k: v for k, v in t.items() if k != "parent"}
        spec = None
        if "host" in spec_keys or "port" in spec_keys:
            spec = parse_broker(read, spec_keys, f)
        elif spec_keys:
            read.fail(f, f"{', '.join(sorted(spec_keys))} set but no host/port: a broker "
                         "that `fedbus run` starts takes no settings; give host and port "
                         "of a running broker or remove them")
        out[name] = BrokerNode(name=name, parent=parent, spec=spec)
    roots = [b.name for b in out.values() if b.parent is None]
    if len(roots) != 1:
        read.fail("brokers", f"exactly one broker (the root) has no parent, found "
                             f"{len(roots)}: {', '.join(roots) or 'none'}; give every other "
                             "broker `parent: NAME` (the broker it bridges to)")
    for b in out.values():
        seen = {b.name}
        up = b.parent
        while up is not None:
            if up not in out:
                read.fail(f"brokers.{b.name}.parent",
                          f"unknown broker {up!r}; known: {', '.join(out)}")
            if up in seen:
                read.fail(f"brokers.{b.name}.parent",
                          f"brokers bridge in a loop through {up!r}; every chain of parents "
                          f"must end at the root broker {roots[0]!r}")
            seen.add(up)
            up = out[up].parent
    return MappingProxyType(out)


def node_brokers(read: Reader, nodes: tuple[NodeSpec, ...],
                 brokers: Mapping[str, BrokerNode]) -> tuple[NodeSpec, ...]:
    """Give every node its broker: its own ``broker:``, else its parent's, else the root
    broker. Bridges connect every broker of the tree, so a parent on another broker is
    reachable; what crosses is derived from the wiring (``fedbus bridge``)."""
    root = next(b.name for b in brokers.values() if b.parent is None)
    by_id = {n.id: n for n in nodes}
    for i, n in enumerate(nodes):
        if n.broker is not None and n.broker not in brokers:
            read.fail(f"nodes[{i}].broker", f"{n.id!r} uses unknown broker {n.broker!r}; "
                                            f"known: {', '.join(brokers)}")

    def resolve(n: NodeSpec) -> str:
        seen: set[str] = set()
        while n.broker is None and n.parent is not None and n.parent not in seen:
            seen.add(n.id)
            n = by_id[n.parent]
        return n.broker or root

    return tuple(dataclasses.replace(n, broker=resolve(n)) for n in nodes)


def root_spec(brokers: Mapping[str, BrokerNode]) -> BrokerSpec | None:
    # With several brokers, ``Manifest.broker`` is the root's (the aggregator's, usually):
    # settings such as chunk_bytes are read from it; None while fedbus run has to start it.
    return next((b.spec for b in brokers.values() if b.parent is None), None)
