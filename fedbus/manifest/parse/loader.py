"""Reading a manifest: the file, its YAML, ``${VAR}`` expansion, then every section in order into
one frozen ``Manifest``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from fedbus.errors import ManifestError
from fedbus.manifest._yaml import expand, load_yaml
from fedbus.manifest.model import VERSION, BrokerNode, Manifest, SecuritySpec, thaw
from fedbus.manifest.parse.brokers import node_brokers, parse_broker, parse_brokers, root_spec
from fedbus.manifest.parse.checkpoint import parse_checkpoint
from fedbus.manifest.parse.codec import parse_codec
from fedbus.manifest.parse.groups import parse_groups
from fedbus.manifest.parse.nodes import parse_nodes, relay_strategies
from fedbus.manifest.parse.population import parse_population, population_round
from fedbus.manifest.parse.reader import Reader
from fedbus.manifest.parse.round import MAX_ROUNDS, parse_evaluate, parse_round
from fedbus.manifest.parse.security import parse_security
from fedbus.manifest.parse.store import parse_store
from fedbus.manifest.parse.strategy import parse_plugin
from fedbus.manifest.parse.task import parse_task
from strategies.base import AsyncStrategy
from strategies.registry import make_selector, make_strategy

__all__ = ["load_manifest", "parse_manifest"]


_TOP_KEYS: Final = ("version", "job", "seed", "rounds", "broker", "codec", "strategy",
                    "selector", "round", "evaluate", "task", "nodes", "trainers", "population",
                    "checkpoint", "store", "brokers", "security")


def load_manifest(path: str | os.PathLike[str], *,
                  env: Mapping[str, str] | None = None) -> Manifest:
    """Read, expand and validate a YAML manifest. ``env`` defaults to ``os.environ``."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ManifestError(source, "(file)", f"cannot read: {exc.strerror or exc}") from None
    return parse_manifest(load_yaml(text, source), source, env=env)


def parse_manifest(data: Any, source: str = "<string>", *,
                   env: Mapping[str, str] | None = None) -> Manifest:
    """Validate already-parsed manifest data (a YAML string is parsed first)."""
    if isinstance(data, str):
        data = load_yaml(data, source)
    data = expand(data, "", source, os.environ if env is None else env)
    return _build(Reader(source), data)


def _build(read: Reader, data: Any) -> Manifest:
    """The top-level keys, then each section, in the order later ones depend on earlier ones."""
    t = read.table(data, "", (*_TOP_KEYS, "groups"),
                   required=("version", "job", "rounds", "task", "nodes"))
    version = t["version"]
    if isinstance(version, bool) or version != VERSION:
        read.fail("version", f"unsupported manifest version {version!r}; this fedbus reads "
                             f"version: {VERSION}")
    job = read.ident(t["job"], "job")
    rounds = read.integer(t["rounds"], "rounds", lo=1, hi=MAX_ROUNDS)
    seed = read.integer(t.get("seed", 0), "seed", lo=0, hi=2**63 - 1)
    population = None
    if t.get("population") is not None:
        population = parse_population(read, t["population"])
        if t.get("trainers") is not None:
            read.fail("trainers", "a manifest with `population:` has virtual clients as its "
                                  "trainers; remove `trainers:`")
    nodes = parse_nodes(read, t["nodes"], t.get("trainers"), population)
    brokers: Mapping[str, BrokerNode] = MappingProxyType({})
    if t.get("brokers") is not None:
        if t.get("broker") is not None:
            read.fail("brokers", "`broker:` and `brokers:` exclude each other: with several "
                                 "brokers, give each one's host/port (and credentials) "
                                 "under `brokers:`")
        if population is not None:
            read.fail("brokers", "a simulation (`population:`) runs on one broker")
        brokers = parse_brokers(read, t["brokers"])
        nodes = node_brokers(read, nodes, brokers)
    else:
        for i, n in enumerate(nodes):
            if n.broker is not None:
                read.fail(f"nodes[{i}].broker", f"{n.id!r} names broker {n.broker!r} but the "
                          "manifest has no `brokers:` section; add one or remove the key")
    n_trainers = sum(1 for n in nodes if n.role == "trainer")
    rnd = parse_round(read, t.get("round"), n_trainers)
    if population is not None:
        rnd = population_round(read, t.get("round"), rnd, population)
    strategy = parse_plugin(read, t.get("strategy", "fedavg"), "strategy", make_strategy)
    relay_strategies(read, nodes, strategy)
    return Manifest(
        job=job,
        rounds=rounds,
        seed=seed,
        broker=(parse_broker(read, t["broker"]) if t.get("broker") is not None
                else root_spec(brokers)),
        codec=parse_codec(read, t.get("codec")),
        strategy=strategy,
        selector=parse_plugin(read, t.get("selector", "all"), "selector", make_selector),
        round=rnd,
        evaluate=parse_evaluate(read, t.get("evaluate")),
        task=parse_task(read, t["task"]),
        nodes=nodes,
        source=read.src,
        population=population,
        groups=parse_groups(read, t.get("groups"), nodes, rnd,
                            parse_plugin(read, t.get("strategy", "fedavg"), "strategy",
                                         make_strategy),
                            parse_codec(read, t.get("codec")), population),
        store=parse_store(read, t.get("store"), nodes, isinstance(
            make_strategy(strategy.name, thaw(strategy.params)), AsyncStrategy)),
        checkpoint=parse_checkpoint(read, t.get("checkpoint")),
        security=_security(read, t.get("security"), population is not None),
        brokers=brokers,
    )


def _security(read: Reader, value: Any, simulated: bool) -> SecuritySpec:
    spec = parse_security(read, value)
    if simulated and spec.sign != "off":
        read.fail("security.sign", "a simulation's virtual clients run inside its workers, "
                  "which speak for them: signing is for deployments; remove security.sign")
    return spec
