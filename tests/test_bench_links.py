"""The shaped-links benchmark's plumbing (benchmarks/bench_links.py): its namespaces, veths and
qdiscs come up and are all gone afterwards, and its report adds up. No timing is asserted."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from benchmarks import bench_links


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_cases_parse_and_the_run_bound_covers_the_bytes() -> None:
    assert bench_links.parse_cases("10:1M,50:11M") == ((10.0, 1_000_000), (50.0, 11_000_000))
    # 4 MB at 10 Mbit/s is 3.2 s a direction: three rounds in waves of 4 of 10 uploads
    bound = bench_links._expected_s("fedbus", 10, 1_000_000, 3, 10, 4)
    assert bound > 3 * 3.2 * (1 + 3)
    assert bench_links._expected_s("fedbus+int8/int8", 10, 1_000_000, 3, 10, 4) < bound


def test_digits_cases_parse_and_report_time_to_the_target() -> None:
    assert bench_links.parse_cases("10:digits,50:1M") == ((10.0, bench_links.DIGITS),
                                                          (50.0, 1_000_000))
    assert bench_links._expected_s("fedbus", 10, bench_links.DIGITS, 20, 10, 4) >= 200

    def run(engine: str, curve: list[tuple[float, float]]) -> bench_links.Run:
        return bench_links.Run(engine, engine, 10, bench_links.DIGITS, 10, 0, [9.0, 0.5, 0.5],
                               {"total": 0.3}, [18e3] * 10, [15e3] * 10, 3.0, 60.0, curve)

    # fedbus reaches 0.94 in round 3 at 11 s; Flower in round 4 at 22 s; a third run never
    fedbus = run("fedbus", [(9.0, 0.7), (10.0, 0.9), (11.0, 0.95), (12.0, 0.96)])
    flower = run("flower", [(10.0, 0.7), (14.0, 0.9), (18.0, 0.93), (22.0, 0.95)])
    assert fedbus.to_target(0.94) == (11.0, 3) and fedbus.after_first(0.94) == 2.0
    assert run("x", [(1.0, 0.5)]).to_target(0.94) is None
    text = bench_links.digits_table([flower, fedbus], 0.94)
    assert "| 10 Mbit/s | 10 | fedbus | 11.00 (11.00–11.00) | **0.50** | 2.00 | 3 | 0.9600 " \
           "| 0.500 | 18.0 / 15.0 |" in text
    assert "| flower | 22.00 (22.00–22.00) | **1.00** | 12.00 | 4 | 0.9500 |" in text


def test_table_gives_each_engine_against_flower() -> None:
    def run(engine: str, s: float) -> bench_links.Run:
        return bench_links.Run(engine, engine, 10, 1_000_000, 10, 0, [9.0, s, s], {"total": 1.0},
                               [4.2e6] * 10, [4.1e6] * 10, 3.0, 60.0)

    text = bench_links.table([run("flower", 8.0), run("fedbus", 6.0)])
    assert "| 10 Mbit/s | 1M x 10 | fedbus | 6.00 (6.00–6.00) | **0.75** | 4.20 / 4.10 |" in text
    assert "| flower | 8.00 (8.00–8.00) | **1.00** |" in text


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("tc") is None, reason="needs root and tc")
def test_links_come_up_shaped_and_are_all_deleted() -> None:
    links = bench_links.Links(2, tag=f"t{os.getpid() % 100000}")
    try:
        try:
            links.up()
        except subprocess.CalledProcessError as exc:  # no CAP_NET_ADMIN here (a container)
            pytest.skip(f"cannot create network namespaces: {exc.stderr!r}")
        links.shape(50)
        assert {links.hub, links.device(0), links.device(1)} <= _namespaces()
        qdisc = subprocess.run(["tc", "-n", links.device(1), "qdisc", "show", "dev",
                                links.dev_if(1)], capture_output=True, text=True, check=True,
                               timeout=30).stdout
        assert "tbf" in qdisc and "50Mbit" in qdisc
        route = subprocess.run(["ip", "-n", links.device(0), "route", "get",
                                bench_links.HUB_ADDR], capture_output=True, text=True,
                               check=True, timeout=30).stdout
        assert links.dev_if(0) in route
    finally:
        links.down()
    assert not {links.hub, links.device(0), links.device(1)} & _namespaces()
