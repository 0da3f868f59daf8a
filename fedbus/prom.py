"""Prometheus metrics of the aggregator (``--metrics HOST:PORT`` on ``run`` and ``serve``):
round, participants, round seconds, evaluation, bytes and rejections by reason, scraped from
``/metrics``. Needs the optional 'metrics' extra (prometheus-client); its own registry, so two
exporters in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedbus.errors import FedbusError

__all__ = ["PromExporter"]


class PromExporter:
    """Serves ``/metrics`` on ``host:port`` from a thread; ``observe`` feeds it one round."""

    def __init__(self, job: str, host: str, port: int) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
        except ImportError:
            raise FedbusError("--metrics needs prometheus-client: pip install "
                              "'fedbus[metrics]'") from None
        self.job = job
        self.registry = CollectorRegistry()
        r = self.registry

        def gauge(name: str, doc: str) -> Any:
            return Gauge(f"fedbus_{name}", doc, ["job"], registry=r).labels(job)

        def counter(name: str, doc: str) -> Any:
            return Counter(f"fedbus_{name}", doc, ["job"], registry=r).labels(job)

        self.round = gauge("round", "last finished round (model version when asynchronous)")
        self.selected = gauge("selected", "trainers selected for the last round")
        self.participants = gauge("participants", "updates aggregated in the last round")
        self.round_seconds = gauge("round_seconds", "duration of the last round")
        self.accuracy = gauge("accuracy", "accuracy of the global model, last evaluation")
        self.loss = gauge("loss", "loss of the global model, last evaluation")
        self.bytes_sent = counter("bytes_sent", "payload bytes the aggregator published")
        self.bytes_received = counter("bytes_received", "payload bytes the aggregator received")
        self.lost = counter("lost", "selected trainers lost during a round")
        self.rejections = Counter("fedbus_rejections", "messages rejected, by reason",
                                  ["job", "reason"], registry=r)
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=r)
        except OSError as exc:
            raise FedbusError(f"--metrics: cannot listen on {host}:{port}: {exc}") from None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def observe(self, row: Mapping[str, Any]) -> None:
        self.round.set(row.get("round", 0))
        self.selected.set(row.get("selected", 0))
        self.participants.set(row.get("participants", 0))
        self.round_seconds.set(row.get("seconds", 0.0))
        for key, metric in (("accuracy", self.accuracy), ("loss", self.loss)):
            if isinstance(row.get(key), (int, float)):
                metric.set(row[key])
        self.bytes_sent.inc(max(int(row.get("bytes_sent", 0)), 0))
        self.bytes_received.inc(max(int(row.get("bytes_received", 0)), 0))
        self.lost.inc(len(row.get("lost", [])))
        for reason, count in (row.get("rejected") or {}).items():
            self.rejections.labels(self.job, str(reason)).inc(int(count))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
