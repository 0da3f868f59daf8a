"""The ``round:`` and ``evaluate:`` sections: deadlines, quorum and the intake's bounds, and how
often the server evaluates.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from fedbus.manifest.model import EvalSpec, RoundSpec
from fedbus.manifest.parse.reader import Reader, field_names

__all__ = ["MAX_ROUNDS", "MAX_WAIT_S", "parse_evaluate", "parse_round"]

#: Bounds where a value cannot make sense: a job of more rounds than this, or a wait longer
#: than a week, is a typo (``rounds: 1e30`` ran "forever").
MAX_ROUNDS = 10_000_000
MAX_WAIT_S = 7 * 24 * 3600


def parse_round(read: Reader, value: Any, n_trainers: int) -> RoundSpec:
    d = RoundSpec()
    t = read.table({} if value is None else value, "round", field_names(RoundSpec))
    positive = f"in (0, {MAX_WAIT_S:,}] (seconds: a week at most)"

    def seconds(x: float) -> bool:
        return 0 < x <= MAX_WAIT_S

    spec = RoundSpec(
        deadline_s=read.number(t.get("deadline_s", d.deadline_s), "round.deadline_s",
                               seconds, positive),
        quorum=read.number(t.get("quorum", d.quorum), "round.quorum",
                           lambda x: 0 < x <= 1, "in (0, 1] (fraction of selected trainers)"),
        min_clients=read.integer(t.get("min_clients", d.min_clients), "round.min_clients",
                                 lo=1),
        start_timeout_s=read.number(t.get("start_timeout_s", d.start_timeout_s),
                                    "round.start_timeout_s", seconds, positive),
        max_uploads=read.integer(t.get("max_uploads", d.max_uploads), "round.max_uploads",
                                 lo=1, hi=10_000),
        upload_burst_mb=read.number(t.get("upload_burst_mb", d.upload_burst_mb),
                                    "round.upload_burst_mb", lambda x: 0 <= x <= 1 << 20,
                                    "in [0, 1048576] (megabytes of updates granted with "
                                    "the order; 0: every large update asks first)"),
        max_update_norm=None if t.get("max_update_norm") is None else read.number(
            t["max_update_norm"], "round.max_update_norm", lambda x: x > 0,
            "> 0 (L2 norm of an update's delta), or omit it for no bound"),
        max_examples=read.integer(t.get("max_examples", d.max_examples),
                                  "round.max_examples", lo=1),
        loss_grace_s=None if t.get("loss_grace_s") is None else read.number(
            t["loss_grace_s"], "round.loss_grace_s", lambda x: 0 <= x <= 60,
            "in [0, 60] (seconds)"),
    )
    if spec.min_clients > n_trainers:
        read.fail("round.min_clients",
                  f"{spec.min_clients} exceeds the {n_trainers} trainer(s) the manifest "
                  "declares; lower it or add trainers")
    return spec


def parse_evaluate(read: Reader, value: Any) -> EvalSpec:
    d = EvalSpec()
    t = read.table({} if value is None else value, "evaluate", field_names(EvalSpec))
    where = read.choice(t.get("where", d.where), "evaluate.where", ("server", "none"))
    return EvalSpec(where=cast(Literal["server", "none"], where),
                    every=read.integer(t.get("every", d.every), "evaluate.every", lo=1,
                                       hi=MAX_ROUNDS))
