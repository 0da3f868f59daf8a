"""The deployment commands of ``fedbus``: ``acl``, ``certs``, ``compose``, ``units``, ``bridge``.

Each generates files from a manifest (``fedbus.deploy``); ``fedbus.cli`` registers them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from fedbus.errors import ManifestError
from fedbus.manifest import broker_address, load_manifest

__all__ = ["COMMANDS"]

Adder = Callable[..., argparse.ArgumentParser]


def _parse_broker(value: str) -> Any:
    try:
        return broker_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_acl(add: Adder) -> None:
    acl = add("acl", "write broker users, passwords and per-node rights (mosquitto)", """\
  fedbus acl manifest.yaml --out secure/ --operator ops
  mosquitto -c secure/broker.conf
""", _cmd_acl)
    acl.add_argument("manifest")
    acl.add_argument("--out", required=True, help="folder for passwd, acl, dynsec.json, ...")
    acl.add_argument("--secrets", help="NODE=password lines; other nodes get random ones")
    acl.add_argument("--operator", action="append", default=[],
                     help="an operator user (watch metrics, send control); repeatable")
    acl.add_argument("--backend", choices=("dynsec", "acl_file"), default="dynsec",
                     help="dynsec (refuses forbidden subscriptions visibly) or acl_file")
    acl.add_argument("--plugin", help="path of mosquitto_dynamic_security.so on the broker")
    acl.add_argument("--broker-dir", help="where the broker sees --out (e.g. a container mount)")
    acl.add_argument("--certs", help="folder from `fedbus certs`: add mTLS to the broker lines")
    acl.add_argument("--listen", metavar="HOST:PORT", type=_parse_broker,
                     help="listener of the whole broker.conf (default 0.0.0.0 and the "
                     "manifest's port)")
    acl.add_argument("--persistence-dir", default="/var/lib/mosquitto/",
                     help="broker.conf's persistence_location")
    acl.add_argument("--group", help="give the broker's files to this group (mosquitto; root)")



def _add_certs(add: Adder) -> None:
    certs = add("certs", "write a CA, the broker's and one certificate per node (CN = node id)",
                """\
  fedbus certs manifest.yaml --out certs/ --host broker.lan
""", _cmd_certs)
    certs.add_argument("manifest")
    certs.add_argument("--out", required=True)
    certs.add_argument("--host", action="append", default=[],
                       help="a name or address clients dial the broker by; repeatable")
    certs.add_argument("--operator", action="append", default=[])
    certs.add_argument("--days", type=int, default=825)



def _add_compose(add: Adder) -> None:
    comp = add("compose", "write a docker compose file: broker, redis if needed, every node", """\
  fedbus compose examples/digits/compose-manifest.yaml --out compose.yaml
  fedbus compose manifest.yaml --secure secure/ --out compose.yaml
  fedbus compose examples/compose/three-level-bridged.yaml --out compose.yaml
  FEDBUS_BROKER_PORT=18830 fedbus compose examples/digits/compose-manifest.yaml \\
      --network host --out compose.yaml
""", _cmd_compose)
    comp.add_argument("manifest", help="path relative to the project root, where compose runs")
    comp.add_argument("--out", help="file to write (default: stdout)")
    comp.add_argument("--redis", action=argparse.BooleanOptionalAction, default=None,
                      help="add redis (default: only when a node's role uses it)")
    comp.add_argument("--secure", metavar="DIR",
                      help="generate broker users/rights into DIR and lock the broker down")
    comp.add_argument("--certs", metavar="DIR", help="a `fedbus certs` folder: mTLS")
    comp.add_argument("--image", default="fedbus:dev")
    comp.add_argument("--network", choices=("bridge", "host"), default="bridge",
                      help="bridge: a compose network, the broker's port published (default);"
                      " host: every container on the host's network, brokers and redis on "
                      "127.0.0.1 (hosts without a bridge network, or many brokers on one box)")
    comp.add_argument("--redis-port", type=int, default=6379,
                      help="redis's port with --network host (default 6379)")
    comp.add_argument("--config-dir", default="brokers/generated", metavar="DIR",
                      help="where broker configs are written when brokers/compose.conf does not"
                      " fit (--network host, several brokers); relative to the project root")



def _add_units(add: Adder) -> None:
    units = add("units", "write a node's systemd unit and environment file", """\
  fedbus units manifest.yaml --node trainer-3 --out units/ --secure secure/
""", _cmd_units)
    units.add_argument("manifest")
    units.add_argument("--node", required=True)
    units.add_argument("--out", required=True, help="folder for fedbus-NODE.service, NODE.env")
    units.add_argument("--manifest-path", help="the manifest's path on the device "
                       "(default: this file's absolute path)")
    units.add_argument("--prefix", default="/opt/fedbus", help="install prefix (venv, app)")
    units.add_argument("--env-dir", default="/etc/fedbus", help="where NODE.env is installed")
    units.add_argument("--secure", metavar="DIR",
                       help="a `fedbus acl` folder: put the node's password in its env file")
    units.add_argument("--systemd", type=int, default=252,
                       help="systemd version on the device (>= 254 adds restart backoff)")
    units.add_argument("--broker", metavar="HOST:PORT", type=_parse_broker,
                       help="the broker the node connects to, written into ExecStart "
                       "(for manifests that name none, like examples/topologies/)")



def _cmd_acl(args: argparse.Namespace, sink: Any) -> int:
    m = load_manifest(args.manifest)
    from fedbus.deploy.passwords import read_secrets_file
    from fedbus.deploy.security import TlsFiles, write_broker_security

    users = [n.id for n in m.nodes] + list(args.operator)
    given = read_secrets_file(args.secrets, users) if args.secrets else None
    tls = None
    if args.certs:
        d = os.path.abspath(args.certs)
        tls = TlsFiles(ca=f"{d}/ca.crt", cert=f"{d}/broker.crt", key=f"{d}/broker.key")
    files = write_broker_security(m, args.out, passwords=given, operators=args.operator,
                                  backend=args.backend, plugin=args.plugin,
                                  broker_dir=args.broker_dir, tls=tls,
                                  persistence_dir=args.persistence_dir,
                                  port=args.listen.port if args.listen else None,
                                  listen_host=args.listen.host if args.listen else "0.0.0.0",
                                  group=args.group)
    # Paths only: the passwords stay in their 0600 files.
    print(f"users     {len(files.users)}: {', '.join(files.users)}")
    print(f"broker    append {files.conf} to mosquitto.conf ({files.backend}); "
          f"it reads {files.dynsec if files.backend == 'dynsec' else files.acl}")
    print(f"passwords {files.password_dir}/<node> (mode 0600): give each node only its own")
    print(f"or run    mosquitto -c {files.broker_conf}  (a whole config: listener, persistence, "
          "limits, security)")
    return 0


def _cmd_certs(args: argparse.Namespace, sink: Any) -> int:
    m = load_manifest(args.manifest)
    from fedbus.deploy.certs import write_certs

    files = write_certs(m, args.out, broker_hosts=args.host, operators=args.operator,
                        days=args.days)
    print(f"ca        {files.ca} (keep ca.key offline once nodes have their certificates)")
    print(f"broker    {files.broker_cert}, {files.broker_key}")
    print(f"nodes     {files.out_dir}/nodes/<node>.crt|.key for {len(files.users)} users, "
          "CN = node id")
    return 0


def _cmd_compose(args: argparse.Namespace, sink: Any) -> int:
    m = load_manifest(args.manifest)
    from fedbus.deploy.compose import compose_yaml

    text = compose_yaml(m, args.manifest, redis=args.redis, image=args.image,
                        secure_dir=args.secure, certs_dir=args.certs, network=args.network,
                        redis_port=args.redis_port, config_dir=args.config_dir)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text, end="")
    return 0


def _cmd_units(args: argparse.Namespace, sink: Any) -> int:
    m = load_manifest(args.manifest)
    from pathlib import Path

    from fedbus.deploy.units import write_unit

    password = None
    if args.secure:
        try:
            password = (Path(args.secure) / "passwords" / args.node).read_text().strip()
        except OSError as exc:
            raise ManifestError(m.source, "nodes", f"no password for {args.node!r} in "
                                f"{args.secure}/passwords: {exc.strerror}; run `fedbus acl` "
                                "first") from None
    from fedbus.deploy.units import check_startable

    broker = f"{args.broker.host}:{args.broker.port}" if args.broker else None
    # A node that cannot start would restart-loop under systemd: refuse, or warn.
    for warning in check_startable(m, args.node, broker=broker, password=password):
        print(f"fedbus units: warning: {warning}", file=sys.stderr)
    files = write_unit(m, args.node, args.out, manifest_path=args.manifest_path,
                       prefix=args.prefix, env_dir=args.env_dir, password=password,
                       systemd_version=args.systemd, broker=broker)
    print(f"unit      {files.unit} -> /etc/systemd/system/{files.name}")
    print(f"env       {files.env} -> {args.env_dir}/{args.node}.env (0640 root:fedbus)")
    return 0


def _add_bridge(add: Adder) -> None:
    bridge = add("bridge", "print the mosquitto bridge from one broker of `brokers:` to its parent",
                 """\
  fedbus bridge examples/topologies/three-level-bridged.yaml --broker site \\
    --parent-address 10.0.0.5:1883 >> site.conf
""", _cmd_bridge)
    bridge.add_argument("manifest")
    bridge.add_argument("--broker", required=True, metavar="NAME",
                        help="the bridging broker (a name under `brokers:`, not the root)")
    bridge.add_argument("--parent-address", metavar="HOST:PORT", type=_parse_broker,
                        help="where the parent broker listens (default: the manifest's)")


def _cmd_bridge(args: argparse.Namespace, sink: Any) -> int:
    from fedbus.deploy.bridge import bridge_config

    m = load_manifest(args.manifest)
    addresses = None
    if args.parent_address is not None and args.broker in m.brokers:
        parent = m.brokers[args.broker].parent
        if parent is not None:
            addresses = {parent: (args.parent_address.host, args.parent_address.port)}
    print(bridge_config(m, args.broker, addresses), end="")
    return 0


def _add_keys(add: Adder) -> None:
    keys = add("keys", "write a signing key pair per node (security.sign: required)", """\
  fedbus keys manifest.yaml --out keys/ --operator ops
""", _cmd_keys)
    keys.add_argument("manifest")
    keys.add_argument("--out", help="folder (default: the manifest's security.keys)")
    keys.add_argument("--operator", action="append", default=[],
                      help="an operator (watch, query, dashboard) that signs too; repeatable")
    keys.add_argument("--rotate", action="append", default=[], metavar="NODE",
                      help="start rotating NODE's key: write NODE.key.next and NODE.pub.next "
                           "(the current pair is kept); repeatable")
    keys.add_argument("--promote", action="append", default=[], metavar="NODE",
                      help="finish rotating NODE's key here: the .next pair becomes its pair; "
                           "repeatable")


def _cmd_keys(args: argparse.Namespace, sink: Any) -> int:
    m = load_manifest(args.manifest)
    from fedbus.connect import keys_dir
    from fedbus.signing import write_key_pair

    out = args.out or str(keys_dir(m))
    ids = [n.id for n in m.nodes] + list(args.operator)
    unknown = sorted(set(args.rotate + args.promote) - set(ids))
    if unknown:
        raise ManifestError(m.source, "nodes", f"no node or operator {unknown[0]!r} to rotate")
    if args.rotate or args.promote:
        return _rotate(out, args.rotate, args.promote)
    made = [i for i in ids if not os.path.exists(os.path.join(out, f"{i}.key"))]
    for node in made:
        write_key_pair(out, node)
    print(f"keys      {out}/<node>.key (private, 0600: give each node only its own) and "
          f"<node>.pub (every node gets them all); {len(made)} new of {len(ids)}")
    return 0


def _rotate(out: str, start: list[str], finish: list[str]) -> int:
    """A key rotation without a restart (docs/security.md, "Rotating a key")."""
    from fedbus.signing import write_key_pair

    for node in start:
        write_key_pair(out, node, suffix=".next")
        print(f"rotating  {node}: 1. copy {out}/{node}.pub.next to every node's keys folder "
              f"(they accept both keys within seconds); 2. put {out}/{node}.key.next on "
              f"{node} as {node}.key (it signs with it within seconds); 3. `fedbus keys "
              f"MANIFEST --promote {node}`, and on every node rename {node}.pub.next to "
              f"{node}.pub (the old key is refused from then on)")
    for node in finish:
        for kind in ("key", "pub"):
            nxt = os.path.join(out, f"{node}.{kind}.next")
            if os.path.exists(nxt):
                os.replace(nxt, os.path.join(out, f"{node}.{kind}"))
            elif kind == "pub":
                raise ManifestError(out, "keys", f"{nxt} is missing: nothing to promote "
                                                 f"(start with --rotate {node})")
        print(f"promoted  {node}: {out}/{node}.pub is its new key, the old one is gone")
    return 0


COMMANDS = (_add_acl, _add_certs, _add_compose, _add_units, _add_bridge, _add_keys)
