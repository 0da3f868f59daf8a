"""What ``fedbus validate`` prints: a short human summary of a valid manifest (nodes, broker,
strategy, codec, wiring), naming where secrets come from, never a secret.
"""

from __future__ import annotations

from fedbus.compress import UpdateCodec
from fedbus.manifest.model import Manifest, PluginSpec, preview, thaw
from fedbus.manifest.wiring import compile_wiring

__all__ = ["describe"]


def describe(m: Manifest) -> str:
    """A short human summary of a valid manifest (what ``fedbus validate`` prints)."""
    wiring = compile_wiring(m)
    by_role: dict[str, list[str]] = {}
    for n in m.nodes:
        by_role.setdefault(n.role, []).append(n.id)
    if m.brokers:
        used: dict[str, int] = {}
        for n in m.nodes:
            used[n.broker or ""] = used.get(n.broker or "", 0) + 1
        broker = "; ".join(
            f"{b.name}" + (f" ({b.spec.host}:{b.spec.port})" if b.spec else " (embedded)")
            + (f" bridged to {b.parent}" if b.parent else " (root)")
            + f", {used.get(b.name, 0)} nodes" for b in m.brokers.values())
    elif m.broker is None:
        broker = ("in-process memory bus (simulation)" if m.population is not None
                  else "embedded mosquitto")
    else:
        b = m.broker
        # Names where secrets come from, never a secret itself.
        tls = " (mTLS)" if b.tls_cert else " (TLS)" if b.tls_ca else ""
        secured = b.password_env or b.password_file or b.tls_cert
        user = f" as {b.username}" if b.username else " as each node's id" if secured else ""
        source = (f", password from ${b.password_env}" if b.password_env else
                  f", password from {b.password_file}" if b.password_file else "")
        broker = f"{b.host}:{b.port}{tls}{user}{source}"

    def plugin(p: PluginSpec) -> str:
        return p.name + (f" {thaw(p.params)}" if p.params else "")

    def mode(u: UpdateCodec) -> str:
        if u.mode == "int8":
            return (f"int8 (block {u.block}, "
                    f"{'stochastic' if u.stochastic else 'nearest'} rounding)")
        return f"topk {u.fraction:g}" if u.mode == "topk" else u.mode

    r = m.round
    roles = "; ".join(f"{len(ids)} {role}{'s' if len(ids) > 1 else ''} ({preview(ids, 4)})"
                      for role, ids in by_role.items())
    subs = sum(len(w.subscribe) for w in wiring.values())
    pubs = sum(len(w.publish) for w in wiring.values())
    lines = [
        f"manifest  {m.source}: valid",
        f"job       {m.job}: {m.rounds} rounds, seed {m.seed}",
        f"broker    {broker}",
        f"strategy  {plugin(m.strategy)}; selector {plugin(m.selector)}",
        f"round     deadline {r.deadline_s:g}s, quorum {r.quorum:g}, min_clients "
        f"{r.min_clients}, start_timeout {r.start_timeout_s:g}s",
        f"evaluate  {m.evaluate.where}" + (f" every {m.evaluate.every} round(s)"
                                           if m.evaluate.where != "none" else ""),
        f"task      {m.task.ref}" + (f" {thaw(m.task.params)}" if m.task.params else ""),
        f"codec     zstd level {m.codec.level}; updates {mode(m.codec.update)}; "
        f"model {mode(m.codec.model)}",
        f"signing   {_signing(m)}",
        f"nodes     {len(m.nodes)}: {roles}",
        f"wiring    {len(wiring)} nodes, {subs} subscriptions, {pubs} publish topics",
    ]
    for g in m.groups:
        lines.append(f"group     {g.id}: {g.mode} of {len(g.members)} under {g.parent} "
                     f"({preview(g.members, 4)}), step timeout {g.step_timeout_s:g}s")
    groups = [f"{n.id} {plugin(n.strategy)}" for n in m.nodes if n.strategy is not None]
    if groups:
        lines.append(f"relays    group strategies: {'; '.join(groups)} (others fedavg)")
    if m.population is not None:
        p = m.population
        lines.append(f"population {p.clients} virtual clients ({p.prefix}0..), {p.per_round} a "
                     f"round, partition {p.partition}"
                     + (f" alpha {p.alpha:g}" if p.partition == "dirichlet" else "")
                     + f", workers {p.workers or 'one per core'}")
    return "\n".join(lines)


def _signing(m: Manifest) -> str:
    sign = m.security.sign
    if sign == "off":
        return ("off: who published a message is only what the broker vouches for "
                "(`fedbus acl`); set security.sign to required on a broker you do not control")
    what = ("unsigned or wrongly signed messages refused" if sign == "required"
            else "signed messages checked, unsigned ones accepted")
    return f"{sign}: {what}; keys in {m.security.keys} (`fedbus keys`)"
