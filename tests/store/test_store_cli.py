"""The store in the manifest (role, section, wiring) and ``fedbus query`` from the shell."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedbus import topics
from fedbus.errors import ManifestError
from fedbus.manifest import compile_wiring, parse_manifest

ROOT = Path(__file__).resolve().parents[2]


def doc(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "version": 1, "job": "toy", "rounds": 3,
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": 64}},
        "nodes": [{"id": "agg", "role": "aggregator"}, {"id": "store", "role": "store"}],
        "trainers": {"count": 3, "prefix": "t", "parent": "agg"},
    }
    base.update(extra)
    return base


def test_a_store_node_defaults_to_the_aggregator_and_subscribes_to_what_it_sends() -> None:
    # Execute
    m = parse_manifest(doc(store={"cache_mb": 64, "full_update_rounds": 5}))
    wiring = compile_wiring(m)["store"]
    # Assert
    assert m.node("store").parent == "agg" and m.num_partitions == 3
    assert m.store.cache_mb == 64 and m.store.full_update_rounds == 5
    assert set(wiring.subscribe) == {topics.updates_for("toy", "agg"), topics.model("toy", "agg"),
                                     topics.work_from("toy", "agg"),  # asynchronous orders
                                     topics.metrics("toy", "agg"),
                                     topics.queries_for("toy", "store")}
    assert topics.replies_all("toy") in wiring.publish


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"store": {"cache_mb": 0}}, "store.cache_mb", ">= 1"),
    ({"store": {"redis_url": "localhost:6379"}}, "store.redis_url", "redis://"),
    ({"store": {"sketch_dims": 8}}, "store.sketch_dims", "did you mean 'sketch_dim'"),
    ({"nodes": [{"id": "agg", "role": "aggregator"},
                {"id": "store", "role": "store", "parent": "t0"}]}, "nodes[1].parent",
     "a trainer"),
    ({"nodes": [{"id": "agg", "role": "aggregator"},
                {"id": "store", "role": "store", "partition": 0}]}, "nodes[1].partition",
     "only trainers"),
    ({"nodes": [{"id": "agg", "role": "aggregator"}], "store": {"cache_mb": 8}}, "store",
     "role: store"),
    ({"nodes": [{"id": "agg", "role": "aggregator"}, {"id": "s", "role": "stor"}]},
     "nodes[1].role", "did you mean 'store'"),
])
def test_store_mistakes_name_the_field(change: dict[str, Any], field: str, words: str) -> None:
    # Execute
    with pytest.raises(ManifestError) as err:
        parse_manifest(doc(**change), "m.yaml")
    # Assert
    assert err.value.field == field and words in err.value.problem, err.value


def test_fedbus_run_starts_the_store_and_query_reads_it_offline(tmp_path: Path) -> None:
    # Prepare
    manifest = tmp_path / "m.yaml"
    manifest.write_text(json.dumps(doc(store={"dir": str(tmp_path / "st")})))
    run = [sys.executable, "-m", "fedbus.cli"]
    # Execute
    done = subprocess.run([*run, "run", str(manifest), "--memory", "--no-record"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    asked = subprocess.run([*run, "query", str(manifest), "scheduling", "--arg", "by=loss",
                            "--round", "2"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    wrong = subprocess.run([*run, "query", str(manifest), "nonsense"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    assert asked.returncode == 0, asked.stderr[-2000:]
    out = json.loads(asked.stdout)
    assert out["ok"] and out["result"]["by"] == "loss" and out["result"]["rounds"] == [1, 2]
    scores = [r["score"] for r in out["result"]["ranking"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert wrong.returncode == 1 and "unknown workload 'nonsense'" in wrong.stderr


@pytest.mark.torch
@pytest.mark.slow
def test_the_readme_store_example_runs_as_documented(tmp_path: Path) -> None:
    # Prepare: the README's commands, from a scratch folder (the store writes to
    # fedbus-store/ and the run to runs/, both relative to where fedbus runs); two rounds
    # instead of five to keep the suite short.
    pytest.importorskip("torch")
    manifest = str(ROOT / "examples" / "digits" / "store-manifest.yaml")
    fedbus = [sys.executable, "-m", "fedbus.cli"]

    def sh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*fedbus, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)

    # Execute
    run = sh("run", manifest, "--rounds", "2")
    malicious = sh("query", manifest, "malicious")
    contribution = sh("query", manifest, "contribution", "--arg", "permutations=4")
    personal = sh("query", manifest, "personalization", "--arg", "k=2", "--arg",
                  "client=trainer-3", "--save", "models/")
    # Assert: every documented query answers (it failed with "keeps sketches only" before:
    # the offline query ignored the manifest's full_update_rounds)
    assert run.returncode == 0, run.stderr[-2000:]
    for done in (malicious, contribution, personal):
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout)["ok"]
    shares = json.loads(contribution.stdout)["result"]
    assert shares and "keeps sketches only" not in contribution.stdout
    assert list((tmp_path / "models").glob("*.fb"))
