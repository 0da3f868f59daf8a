"""The ``population:`` section: a simulation's virtual clients, and the round defaults a
simulation gets.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, cast

from fedbus import topics
from fedbus.errors import BusError
from fedbus.manifest.model import PopulationSpec, RoundSpec
from fedbus.manifest.parse.reader import Reader, field_names

__all__ = ["parse_population", "population_round"]


def parse_population(read: Reader, value: Any) -> PopulationSpec:
    f = "population"
    t = read.table(value, f, field_names(PopulationSpec), required=("clients", "per_round"))
    d = PopulationSpec(clients=1, per_round=1)
    clients = read.integer(t["clients"], f"{f}.clients", lo=1, hi=1_000_000)
    per_round = read.integer(t["per_round"], f"{f}.per_round", lo=1)
    if per_round > clients:
        read.fail(f"{f}.per_round", f"{per_round} exceeds population.clients={clients}; a "
                                    "round cannot sample more clients than exist")
    prefix = read.string(t.get("prefix", d.prefix), f"{f}.prefix")
    try:
        topics.validate_id(f"{prefix}{clients - 1}", "client id")
    except BusError as exc:
        read.fail(f"{f}.prefix", str(exc))
    partition = read.choice(t.get("partition", d.partition), f"{f}.partition",
                            ("iid", "dirichlet"))
    prob = "in [0, 1] (a probability)"
    return PopulationSpec(
        clients=clients,
        per_round=per_round,
        prefix=prefix,
        partition=cast(Literal["iid", "dirichlet"], partition),
        alpha=read.number(t.get("alpha", d.alpha), f"{f}.alpha", lambda x: x > 0,
                          "> 0 (Dirichlet concentration; smaller is more skewed)"),
        workers=read.integer(t.get("workers", d.workers), f"{f}.workers", lo=0, hi=1024),
        speed_sigma=read.number(t.get("speed_sigma", d.speed_sigma), f"{f}.speed_sigma",
                                lambda x: x >= 0, ">= 0 (lognormal spread of speeds)"),
        availability=read.number(t.get("availability", d.availability),
                                 f"{f}.availability", lambda x: 0 < x <= 1,
                                 "in (0, 1] (probability a client is available)"),
        dropout=read.number(t.get("dropout", d.dropout), f"{f}.dropout",
                            lambda x: 0 <= x < 1, "in [0, 1) (probability)"),
        stale_prob=read.number(t.get("stale_prob", d.stale_prob), f"{f}.stale_prob",
                               lambda x: 0 <= x <= 1, prob),
        stale_delay=read.number(t.get("stale_delay", d.stale_delay), f"{f}.stale_delay",
                                lambda x: x >= 0, ">= 0 (virtual seconds)"),
        state_dir=read.opt_string(t.get("state_dir"), f"{f}.state_dir"),
        keep_best=read.boolean(t.get("keep_best", d.keep_best), f"{f}.keep_best"),
        rehearsal=read.boolean(t.get("rehearsal", d.rehearsal), f"{f}.rehearsal"),
    )


def population_round(read: Reader, raw: Any, rnd: RoundSpec, p: PopulationSpec) -> RoundSpec:
    """Simulation defaults: wait for the whole population before round 1 (which clients
    are online must not depend on timing) and a generous wall-clock deadline (dropouts are
    announced, not waited out)."""
    given = raw if isinstance(raw, dict) else {}
    changes: dict[str, Any] = {}
    if "min_clients" not in given:
        changes["min_clients"] = p.clients
    if "deadline_s" not in given:
        changes["deadline_s"] = 3600.0
    return dataclasses.replace(rnd, **changes)
