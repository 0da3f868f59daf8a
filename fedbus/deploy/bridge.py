"""Bridges between the brokers of a manifest, derived from the wiring (``fedbus bridge``).

A manifest's ``brokers:`` form a tree: every broker but the root bridges to its parent's. A
node keeps its topics whichever broker it uses (no prefixes, no remapping), so a bridge only
has to forward the exact topics that a node on one side publishes and a node on the other
side subscribes to. Both sides are read off ``compile_wiring``, the same table the services
subscribe with and the ACLs are generated from: a bridge can never carry less than the
protocol needs, nor more.

"One side" of broker B's bridge is every node on B or on a broker below it (its subtree);
the other side is everyone else, reached through B's parent. Deeper trees chain: a model
from the root reaches a site through the region's bridge (in) and then the site's (in).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from fedbus.errors import ManifestError
from fedbus.manifest import BrokerNode, BrokerSpec, Manifest, compile_wiring
from fedbus.manifest.wiring import Wiring

__all__ = ["BridgeTopic", "bridge_config", "bridge_name", "bridge_rights", "bridge_topics",
           "subtree", "topological"]

Direction = Literal["in", "out", "both"]

#: fedbus publishes and subscribes everything at QoS 1 (fedbus.bus.mqtt); so does the bridge.
_QOS: Final = 1


@dataclass(frozen=True, slots=True, order=True)
class BridgeTopic:
    """One ``topic`` line: an exact topic (or the narrowest filter) and where it goes."""

    topic: str
    direction: Direction
    qos: int = _QOS

    def line(self) -> str:
        return f"topic {self.topic} {self.direction} {self.qos}"


def subtree(m: Manifest, broker: str) -> frozenset[str]:
    """``broker`` and every broker bridged (directly or not) below it."""
    out = {broker}
    grew = True
    while grew:
        grew = False
        for b in m.brokers.values():
            if b.parent in out and b.name not in out:
                out.add(b.name)
                grew = True
    return frozenset(out)


def topological(m: Manifest) -> list[BrokerNode]:
    """The brokers, each after its parent (the order to start them in)."""
    done: list[BrokerNode] = []
    names: set[str | None] = {None}
    while len(done) < len(m.brokers):
        for b in m.brokers.values():
            if b.name not in names and b.parent in names:
                done.append(b)
                names.add(b.name)
    return done


def _intersect(a: str, b: str) -> str | None:
    # fedbus topics and filters use `+` only (never `#`), one level per id: two of them meet
    # iff they agree level by level, and the narrower level is the one to forward.
    la, lb = a.split("/"), b.split("/")
    if len(la) != len(lb):
        return None
    out = []
    for x, y in zip(la, lb, strict=True):
        if x == "+":
            out.append(y)
        elif y == "+" or x == y:
            out.append(x)
        else:
            return None
    return "/".join(out)


def bridge_topics(m: Manifest, broker: str) -> list[BridgeTopic]:
    """What must cross ``broker``'s bridge to its parent, sorted; ``ManifestError`` if the
    broker is unknown or the root (which has no bridge)."""
    _check(m, broker)
    below = subtree(m, broker)
    wiring = compile_wiring(m)
    inside = {n.id for n in m.nodes if n.broker in below}

    def crossing(pubs: bool, subs: bool) -> set[str]:
        # distinct topics published on one side x distinct filters subscribed on the other
        published = {t for n, w in wiring.items() if (n in inside) == pubs for t in w.publish}
        wanted = {f for n, w in wiring.items() if (n in inside) == subs for f in w.subscribe}
        return {meet for t in published for f in wanted
                if (meet := _intersect(t, f)) is not None}

    out, into = crossing(True, False), crossing(False, True)
    way: dict[str, Direction] = {t: "out" for t in out}
    for t in into:
        way[t] = "both" if t in out else "in"
    return sorted(BridgeTopic(t, d) for t, d in way.items())


def bridge_name(m: Manifest, broker: str) -> str:
    """The bridge's connection name and client id: ``fedbus.<job>.bridge.<broker>``."""
    return f"fedbus.{m.job}.bridge.{broker}"


def bridge_rights(m: Manifest) -> dict[str, Wiring]:
    """Per bridge user (``bridge_name``), its rights on its parent broker: it subscribes there
    to what comes in and publishes what goes out. ``fedbus acl`` adds these users."""
    out: dict[str, Wiring] = {}
    for b in m.brokers.values():
        if b.parent is None:
            continue
        lines = bridge_topics(m, b.name)
        out[bridge_name(m, b.name)] = Wiring(
            bridge_name(m, b.name),
            tuple(t.topic for t in lines if t.direction in ("in", "both")),
            tuple(t.topic for t in lines if t.direction in ("out", "both")))
    return out


def _check(m: Manifest, broker: str) -> BrokerNode:
    if not m.brokers:
        raise ManifestError(m.source, "brokers", "the manifest has one broker and so no bridge; "
                                                 "declare several under `brokers:`")
    if broker not in m.brokers:
        raise ManifestError(m.source, "brokers", f"no broker {broker!r}; known: "
                                                 f"{', '.join(m.brokers)}")
    b = m.brokers[broker]
    if b.parent is None:
        raise ManifestError(m.source, f"brokers.{broker}",
                            f"{broker!r} is the root broker: it bridges to nothing (the bridges "
                            "are configured on the brokers below it: "
                            f"{', '.join(c.name for c in m.brokers.values() if c.parent)})")
    return b


def _remote_login(m: Manifest, parent: BrokerSpec, user: str) -> list[str]:
    # The parent broker's generated security (fedbus acl) is per user; the bridge logs in as
    # its own user. Its password is read the way a node's is (password_file with {node}).
    lines: list[str] = []
    secured = parent.password_env or parent.password_file or parent.tls_cert
    if not secured:
        return lines
    lines.append(f"remote_username {parent.username or user}")
    password = None
    if parent.password_file:
        path = Path(parent.password_file.replace("{node}", user))
        if not path.is_absolute() and not m.source.startswith("<"):
            path = Path(m.source).resolve().parent / path
        try:
            password = path.read_text(encoding="utf-8").strip()
        except OSError:
            password = None
    if password is not None:
        lines.append(f"remote_password {password}")
    else:
        source = (f"${parent.password_env}" if parent.password_env
                  else parent.password_file or "the parent broker's password for it")
        lines.append(f"# remote_password: the password of user {user!r} ({source})")
    if parent.tls_ca:
        lines.append(f"bridge_cafile {parent.tls_ca}")
    if parent.tls_cert and parent.tls_key:
        lines.append(f"bridge_certfile {parent.tls_cert.replace('{node}', user)}")
        lines.append(f"bridge_keyfile {parent.tls_key.replace('{node}', user)}")
    return lines


def bridge_config(m: Manifest, broker: str,
                  addresses: Mapping[str, tuple[str, int]] | None = None) -> str:
    """The mosquitto bridge section for ``broker`` toward its parent: append it to that
    broker's config. ``addresses`` gives host/port of brokers ``fedbus run`` started (else
    the manifest's)."""
    b = _check(m, broker)
    assert b.parent is not None
    parent = m.brokers[b.parent]
    if addresses is not None and b.parent in addresses:
        host, port = addresses[b.parent]
    elif parent.spec is not None:
        host, port = parent.spec.host, parent.spec.port
    else:
        raise ManifestError(m.source, f"brokers.{b.parent}",
                            f"broker {b.parent!r} has no host/port: `fedbus run` starts it and "
                            "writes the bridge itself; to deploy the bridge, pass "
                            "--parent-address HOST:PORT or give the broker host and port")
    name = bridge_name(m, broker)
    lines = [
        f"# fedbus bridge {broker} -> {b.parent} for job {m.job}: generated by `fedbus bridge`",
        "# from the manifest's wiring (every topic a node on one side publishes and a node on",
        "# the other side subscribes to). Do not edit: regenerate when the manifest changes.",
        f"connection {name}",
        f"address {host}:{port}",
        "bridge_protocol_version mqttv50",
        f"remote_clientid {name}",
        f"local_clientid {name}.local",
        # mosquitto tells the parent it is a bridge, so nothing echoes back (no loops).
        "try_private true",
        # Keep the session across a link drop: QoS 1 messages queue on the far side meanwhile.
        "cleansession false",
        "restart_timeout 1 10",
        "keepalive_interval 30",
        # $SYS/broker/connection/<name>/state says 1 once up (fedbus run waits on it), on
        # this broker only: the parent's ACL grants the bridge user its topics, not $SYS.
        "notifications true",
        "notifications_local_only true",
        *_remote_login(m, parent.spec or BrokerSpec(), name),
    ]
    topics_ = bridge_topics(m, broker)
    lines.append(f"# {len(topics_)} topics: "
                 f"{sum(t.direction == 'out' for t in topics_)} out (to {b.parent}), "
                 f"{sum(t.direction == 'in' for t in topics_)} in, "
                 f"{sum(t.direction == 'both' for t in topics_)} both")
    lines += [t.line() for t in topics_]
    return "\n".join(lines) + "\n"
