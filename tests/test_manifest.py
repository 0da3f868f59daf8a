"""The manifest: example files load, bad manifests get one clear error, env expansion, wiring."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedbus import topics
from fedbus.errors import ManifestError
from fedbus.manifest import (
    BrokerSpec,
    Manifest,
    NodeSpec,
    compile_wiring,
    describe,
    load_manifest,
    parse_manifest,
    thaw,
    with_broker,
)

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"

BASE: dict[str, Any] = {
    "version": 1,
    "job": "j",
    "seed": 0,
    "rounds": 3,
    "task": {"ref": "no_such_package.task:make_task", "params": {"epochs": 1}},
    "nodes": [
        {"id": "agg", "role": "aggregator"},
        {"id": "t0", "role": "trainer", "parent": "agg", "partition": 0},
        {"id": "t1", "role": "trainer", "parent": "agg", "partition": 1},
    ],
}


def _write(tmp_path: Path, data: Any, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- valid files


def test_digits_manifest_loads() -> None:
    m = load_manifest(DIGITS / "manifest.yaml", env={})

    assert m.job == "digits" and m.rounds == 20 and m.seed == 0
    assert m.broker is None  # embedded broker
    assert m.strategy.name == "fedavg" and m.selector.name == "all"
    assert m.task.ref == "examples.digits.task:make_task"
    assert {"epochs", "lr", "batch_size"} <= set(m.task.params)
    assert m.aggregator.id == "aggregator"
    assert m.num_partitions == 10
    assert [n.id for n in m.trainers_of("aggregator")] == [f"trainer-{i}" for i in range(10)]
    assert m.source == str(DIGITS / "manifest.yaml")


def test_compose_manifest_defaults_to_the_compose_broker() -> None:
    m = load_manifest(DIGITS / "compose-manifest.yaml", env={})

    assert m.broker == BrokerSpec(host="mosquitto", port=1883, keepalive_s=30,
                                  max_queued_messages=100_000)
    assert m.num_partitions == 10  # the digits example's own job, as `fedbus run` runs it


def test_edge_manifest_takes_the_broker_from_the_environment() -> None:
    env = {"FEDBUS_BROKER_HOST": "10.1.2.3", "FEDBUS_BROKER_PORT": "8883",
           "FEDBUS_BROKER_USER": "pi", "FEDBUS_BROKER_TLS_CA": "/etc/fedbus/ca.crt"}
    m = load_manifest(DIGITS / "edge-manifest.yaml", env=env)

    assert m.broker is not None
    assert (m.broker.host, m.broker.port, m.broker.username) == ("10.1.2.3", 8883, "pi")
    assert m.broker.tls_ca == "/etc/fedbus/ca.crt"
    assert m.broker.password_env == "FEDBUS_BROKER_PASSWORD"


def test_edge_manifest_without_broker_host_names_the_variable() -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(DIGITS / "edge-manifest.yaml", env={})

    assert info.value.field == "broker.host"
    assert "FEDBUS_BROKER_HOST" in info.value.problem


def test_minimal_manifest_gets_defaults() -> None:
    m = parse_manifest(copy.deepcopy(BASE))

    assert m.broker is None and m.source == "<string>"
    assert m.strategy.name == "fedavg" and m.selector.name == "all"
    assert m.round.quorum == 1.0 and m.round.min_clients == 1
    assert m.evaluate.where == "server" and m.codec.level == 1


def test_bare_strings_for_strategy_selector_and_task() -> None:
    data = copy.deepcopy(BASE) | {"strategy": "fedavg", "selector": "random",
                                  "task": "pkg.mod:factory"}
    m = parse_manifest(data)

    assert (m.strategy.name, dict(m.strategy.params)) == ("fedavg", {})
    assert m.selector.name == "random"
    assert m.task.ref == "pkg.mod:factory" and dict(m.task.params) == {}


def test_yaml_text_is_accepted() -> None:
    m = parse_manifest(yaml.safe_dump(BASE), "inline.yaml")

    assert m.source == "inline.yaml" and m.job == "j"


def test_task_ref_is_not_imported() -> None:
    # The aggregator may not have torch: validation must never import the task.
    m = parse_manifest(copy.deepcopy(BASE))

    assert m.task.ref.startswith("no_such_package")


def test_trainer_shorthand_expands_with_partitions() -> None:
    data = copy.deepcopy(BASE)
    data["nodes"] = [{"id": "agg", "role": "aggregator"},
                     {"id": "extra", "role": "trainer", "partition": 3}]
    data["trainers"] = {"count": 3, "prefix": "pi-"}

    m = parse_manifest(data)

    trainers = m.trainers_of("agg")
    assert [(n.id, n.partition, n.parent) for n in trainers] == [
        ("extra", 3, "agg"), ("pi-0", 0, "agg"), ("pi-1", 1, "agg"), ("pi-2", 2, "agg")]
    assert m.num_partitions == 4


def test_trainer_without_parent_gets_the_aggregator() -> None:
    data = copy.deepcopy(BASE)
    del data["nodes"][1]["parent"]

    assert parse_manifest(data).node("t0").parent == "agg"


def test_trainer_partition_is_optional() -> None:
    data = copy.deepcopy(BASE)
    del data["nodes"][1]["partition"]

    assert parse_manifest(data).node("t0").partition is None


def test_manifest_is_frozen_and_params_read_only() -> None:
    data = copy.deepcopy(BASE)
    data["task"]["params"] = {"epochs": 1, "layers": [4, 8], "opt": {"lr": 0.1}}
    m = parse_manifest(data)

    with pytest.raises(dataclasses.FrozenInstanceError):
        m.rounds = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        m.task.params["epochs"] = 2  # type: ignore[index]
    data["task"]["params"]["epochs"] = 99  # the model holds its own copy
    assert m.task.params["epochs"] == 1
    assert thaw(m.task.params) == {"epochs": 1, "layers": [4, 8], "opt": {"lr": 0.1}}


def test_node_lookup_and_unknown_node() -> None:
    m = parse_manifest(copy.deepcopy(BASE), "job.yaml")

    assert m.node("t1") == NodeSpec(id="t1", role="trainer", parent="agg", partition=1)
    with pytest.raises(ManifestError) as info:
        m.node("t9")
    assert info.value.path == "job.yaml"
    assert "agg, t0, t1" in info.value.problem


def test_connection_timing_is_set_from_the_manifest() -> None:
    # Prepare: a large deployment's connection settings
    from fedbus.connect import broker_settings

    data = {**copy.deepcopy(BASE), "broker": {"host": "10.0.0.5", "connect_timeout_s": 5,
                                              "connect_wait_s": 600, "reconnect_max_s": 30}}
    # Execute
    options = broker_settings(parse_manifest(data), "t0").options
    # Assert: they reach the connection
    assert (options.connect_timeout_s, options.connect_wait_s, options.reconnect_max_s) == (
        5, 600, 30)
    # and a wait that cannot make sense is one clear error
    bad = {**copy.deepcopy(BASE), "broker": {"host": "10.0.0.5", "connect_wait_s": 0}}
    with pytest.raises(ManifestError) as info:
        parse_manifest(bad)
    assert info.value.field == "broker.connect_wait_s"


def test_with_broker_replaces_only_the_broker() -> None:
    m = parse_manifest(copy.deepcopy(BASE))

    m2 = with_broker(m, BrokerSpec(host="127.0.0.1", port=41883))

    assert m2.broker == BrokerSpec(host="127.0.0.1", port=41883)
    assert m.broker is None
    assert dataclasses.replace(m2, broker=None) == m


def test_describe_summarises() -> None:
    text = describe(load_manifest(DIGITS / "manifest.yaml", env={}))

    assert "digits" in text and "20 rounds" in text
    assert "embedded mosquitto" in text
    assert "fedavg" in text
    assert "1 aggregator" in text and "10 trainers" in text
    assert "53 subscriptions" in text  # NACKs for its chunks; work orders per trainer


# ----------------------------------------------------------------------------- bad manifests


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting a dotted path ('round.quorum', 'nodes.1.parent') in the manifest."""

    def apply(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = d
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target.setdefault(key, {})
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return apply


def _delete(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.pop(key)


def _append_node(node: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["nodes"].append(node)


BAD: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    # name, mutation, field, fragment of the problem
    ("typo top-level", _set("strategi", "fedavg"), "strategi", "did you mean 'strategy'"),
    ("typo nested", _set("round.quorom", 0.5), "round.quorom", "did you mean 'quorum'"),
    ("typo broker", _set("broker.prot", 1883), "broker.prot", "did you mean 'port'"),
    ("typo node", _set("nodes.1.partiton", 0), "nodes[1].partiton", "did you mean 'partition'"),
    ("version 2", _set("version", 2), "version", "version: 1"),
    ("no version", _delete("version"), "version", "missing"),
    ("no job", _delete("job"), "job", "missing"),
    ("bad job id", _set("job", "a/b"), "job", "letters, digits"),
    ("rounds 0", _set("rounds", 0), "rounds", "in [1, 10000000]"),
    ("rounds absurd", _set("rounds", 10**30), "rounds", "in [1, 10000000]"),
    ("deadline absurd", _set("round.deadline_s", 1e12), "round.deadline_s", "a week"),
    ("rounds text", _set("rounds", "ten"), "rounds", "expected an integer"),
    ("rounds bool", _set("rounds", True), "rounds", "expected an integer"),
    ("seed negative", _set("seed", -1), "seed", "got -1"),
    ("quorum 0", _set("round.quorum", 0), "round.quorum", "(0, 1]"),
    ("quorum 1.5", _set("round.quorum", 1.5), "round.quorum", "(0, 1]"),
    ("burst negative", _set("round.upload_burst_mb", -1), "round.upload_burst_mb",
     "in [0, 1048576]"),
    ("burst text", _set("round.upload_burst_mb", "lots"), "round.upload_burst_mb",
     "expected a number"),
    ("deadline negative", _set("round.deadline_s", -1), "round.deadline_s", "in (0, 604,800]"),
    ("min_clients > trainers", _set("round.min_clients", 3), "round.min_clients", "2 trainer"),
    ("round not a mapping", _set("round", [1]), "round", "expected a mapping"),
    ("evaluate where", _set("evaluate.where", "client"), "evaluate.where", "server, none"),
    ("evaluate every 0", _set("evaluate.every", 0), "evaluate.every", "in [1, 10000000]"),
    ("codec level", _set("codec.level", 30), "codec.level", "[0, 22]"),
    ("codec shuffle text", _set("codec.shuffle", "yes"), "codec.shuffle", "true or false"),
    ("broker port", _set("broker.port", 70000), "broker.port", "[1, 65535]"),
    ("broker host", _set("broker.host", "a b"), "broker.host", "host name"),
    ("broker password", _set("broker.password_env", "hunter2!"), "broker.password_env",
     "not the password"),
    ("broker chunk", _set("broker.chunk_bytes", 10), "broker.chunk_bytes", "[1024,"),
    ("unknown strategy", _set("strategy", "fedavgx"), "strategy", "fedavg"),
    ("strategy param", _set("strategy", {"name": "fedavg", "params": {"lr": 1}}),
     "strategy", "unknown parameter"),
    ("strategy params list", _set("strategy", {"name": "fedavg", "params": [1]}),
     "strategy.params", "mapping"),
    ("selector param", _set("selector", {"name": "random", "params": {"fraction": 2}}),
     "selector", "fraction"),
    ("selector unknown", _set("selector", "everyone"), "selector", "all"),
    ("no task", _delete("task"), "task", "missing"),
    ("task ref", _set("task.ref", "examples.digits.task"), "task.ref", "module:factory"),
    ("task ref spaces", _set("task.ref", "a b:c"), "task.ref", "module:factory"),
    ("task params", _set("task.params", [1, 2]), "task.params", "mapping"),
    ("no nodes", _delete("nodes"), "nodes", "missing"),
    ("nodes mapping", _set("nodes", {"agg": "aggregator"}), "nodes", "expected a list"),
    ("node not mapping", _set("nodes.1", "t0"), "nodes[1]", "expected a mapping"),
    ("node without role", _set("nodes.1", {"id": "t0"}), "nodes[1].role", "missing"),
    ("bad node id", _set("nodes.1.id", "t 0"), "nodes[1].id", "letters, digits"),
    ("duplicate id", _set("nodes.2.id", "t0"), "nodes[2].id", "duplicate"),
    ("unknown role", _set("nodes.1.role", "relai"), "nodes[1].role",
     "allowed: aggregator, trainer"),
    ("two aggregators", _set("nodes.1", {"id": "agg2", "role": "aggregator"}),
     "nodes[1].role", "exactly one aggregator"),
    ("no aggregator", _set("nodes.0", {"id": "t9", "role": "trainer", "parent": "t0"}),
     "nodes", "no aggregator"),
    ("no trainers", _set("nodes", [{"id": "agg", "role": "aggregator"}]), "nodes",
     "no trainers"),
    ("aggregator parent", _set("nodes.0.parent", "t0"), "nodes[0].parent", "root"),
    ("aggregator partition", _set("nodes.0.partition", 0), "nodes[0].partition",
     "only trainers"),
    ("unknown parent", _set("nodes.1.parent", "nobody"), "nodes[1].parent", "unknown node"),
    ("trainer parent", _set("nodes.2.parent", "t0"), "nodes[2].parent",
     "must be an aggregator"),
    ("duplicate partition", _set("nodes.2.partition", 0), "nodes[2].partition", "unique"),
    ("partition range", _set("nodes.1.partition", 2), "nodes[1].partition", "0..1"),
    ("partition negative", _set("nodes.1.partition", -1), "nodes[1].partition", ">= 0"),
    ("shorthand count", _set("trainers", {"count": 0}), "trainers.count", "[1, "),
    ("shorthand prefix", _set("trainers", {"count": 2, "prefix": "a/"}), "trainers.prefix",
     "letters, digits"),
    ("shorthand key", _set("trainers", {"count": 2, "prefx": "p"}), "trainers.prefx",
     "did you mean 'prefix'"),
    ("shorthand collides", _set("trainers", {"count": 1, "prefix": "t"}), "trainers",
     "duplicate node id 't0'"),
    ("shorthand parent", _set("trainers", {"count": 1, "prefix": "x", "parent": "t0"}),
     "trainers.parent", "must be an aggregator"),
    ("env unset", _set("job", "${NO_SUCH_FEDBUS_VAR}"), "job", "NO_SUCH_FEDBUS_VAR"),
    ("env bad name", _set("job", "${1x}"), "job", "bad substitution"),
    ("env unclosed", _set("job", "${JOB"), "job", "unclosed"),
]


@pytest.mark.parametrize(("mutate", "field", "fragment"),
                         [pytest.param(m, f, p, id=n) for n, m, f, p in BAD])
def test_bad_manifest_names_file_field_and_fix(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], field: str, fragment: str
) -> None:
    data = copy.deepcopy(BASE)
    mutate(data)
    path = _write(tmp_path, data)

    with pytest.raises(ManifestError) as info:
        load_manifest(path, env={})

    err = info.value
    assert err.path == str(path)
    assert err.field == field, str(err)
    assert fragment in err.problem, str(err)
    assert str(err).startswith(f"{path}: {field}: ")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = _write(tmp_path, "- just\n- a list\n")

    with pytest.raises(ManifestError) as info:
        load_manifest(path)

    assert info.value.field == "(top level)"
    assert "expected a mapping" in info.value.problem


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "version: 1\njob: j\nnodes: [\n  {id: a\n")

    with pytest.raises(ManifestError) as info:
        load_manifest(path)

    assert info.value.path == str(path)
    assert "line " in info.value.problem and "column " in info.value.problem


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "version: 1\nrounds: 3\nrounds: 4\n")

    with pytest.raises(ManifestError) as info:
        load_manifest(path)

    assert "duplicate key 'rounds'" in info.value.problem
    assert "line 3" in info.value.problem


def test_missing_file() -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest("/nonexistent/fedbus.yaml")

    assert info.value.path == "/nonexistent/fedbus.yaml"
    assert "cannot read" in info.value.problem


def test_yaml_cannot_construct_objects(tmp_path: Path) -> None:
    path = _write(tmp_path, "version: !!python/object/apply:os.system ['true']\n")

    with pytest.raises(ManifestError):
        load_manifest(path)


# ----------------------------------------------------------------------------- env expansion


def test_env_expansion_defaults_and_typed_fields() -> None:
    data = copy.deepcopy(BASE)
    data["job"] = "${JOB:-digits}"
    data["broker"] = {"host": "${HOST}", "port": "${PORT:-1883}", "username": "${USER_NAME:-}"}
    data["codec"] = {"shuffle": "${SHUFFLE:-false}"}
    data["round"] = {"quorum": "${QUORUM}"}

    m = parse_manifest(data, env={"HOST": "broker.lan", "QUORUM": "0.5", "SHUFFLE": "yes"})

    assert m.job == "digits"
    assert m.broker == BrokerSpec(host="broker.lan", port=1883, username=None)
    assert m.codec.shuffle is True
    assert m.round.quorum == 0.5


def test_env_default_used_when_empty_and_value_when_set() -> None:
    data = copy.deepcopy(BASE) | {"job": "${JOB:-fallback}"}

    assert parse_manifest(data, env={"JOB": ""}).job == "fallback"
    assert parse_manifest(data, env={"JOB": "mine"}).job == "mine"


def test_env_in_params_reads_yaml_scalars() -> None:
    data = copy.deepcopy(BASE)
    data["task"]["params"] = {"epochs": "${EPOCHS:-2}", "lr": "${LR}", "name": "run-${RUN}",
                              "flag": "${FLAG:-true}", "literal": "costs $$5"}

    m = parse_manifest(data, env={"LR": "0.05", "RUN": "7"})

    assert dict(m.task.params) == {"epochs": 2, "lr": 0.05, "name": "run-7", "flag": True,
                                   "literal": "costs $5"}


def test_env_expansion_does_not_touch_keys_or_plain_strings() -> None:
    data = copy.deepcopy(BASE)
    data["task"]["params"] = {"${KEY}": "a $ sign", "n": "007"}

    m = parse_manifest(data, env={"KEY": "x"})

    assert dict(m.task.params) == {"${KEY}": "a $ sign", "n": "007"}


def test_env_typed_field_with_bad_text_says_what_was_expected() -> None:
    data = copy.deepcopy(BASE) | {"rounds": "${ROUNDS}"}

    with pytest.raises(ManifestError) as info:
        parse_manifest(data, env={"ROUNDS": "many"})

    assert info.value.field == "rounds"
    assert "expected an integer" in info.value.problem and "many" in info.value.problem


def test_env_defaults_to_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDBUS_TEST_JOB", "from-env")
    data = copy.deepcopy(BASE) | {"job": "${FEDBUS_TEST_JOB}"}

    assert parse_manifest(data).job == "from-env"


# ----------------------------------------------------------------------------- wiring


def _digits() -> Manifest:
    return load_manifest(DIGITS / "manifest.yaml", env={})


def test_wiring_uses_the_topic_grammar() -> None:
    w = compile_wiring(_digits())

    agg = w["aggregator"]
    assert topics.updates_for("digits", "aggregator") in agg.subscribe
    assert topics.model("digits", "aggregator") in agg.publish
    assert topics.control("digits", "trainer-3") in agg.publish
    t3 = w["trainer-3"]
    assert t3.subscribe == (topics.model("digits", "aggregator"),
                            topics.control("digits", "trainer-3"),
                            topics.nacks_for("digits", "trainer-3"),
                            topics.work("digits", "trainer-3", "aggregator"),
                            topics.presence("digits", "trainer-3"))
    assert t3.publish == (topics.update("digits", "aggregator", "trainer-3"),
                          topics.nack("digits", "aggregator", "trainer-3"),
                          topics.presence("digits", "trainer-3"))
    assert set(w) == {n.id for n in _digits().nodes}


def test_wiring_connects_every_trainer_and_its_aggregator() -> None:
    m = _digits()
    w = compile_wiring(m)

    for trainer in m.trainers_of("aggregator"):
        for topic in w[trainer.id].publish:
            assert all(topics.validate_filter(t) for t in w[trainer.id].subscribe)
            if topics.parse(topic).channel in ("update", "presence"):
                assert any(topics.matches(f, topic) for f in w["aggregator"].subscribe), topic
        model = topics.model(m.job, "aggregator")
        assert model in w["aggregator"].publish
        assert any(topics.matches(f, model) for f in w[trainer.id].subscribe)


def test_wiring_does_not_cross_aggregators() -> None:
    # A trainer's update topic names its parent, so only that aggregator receives it.
    w = compile_wiring(_digits())

    update = w["trainer-0"].publish[0]
    assert topics.parse(update).levels == ("aggregator", "trainer-0")
    assert not any(topics.matches(f, update) for f in w["trainer-1"].subscribe)


def test_a_yaml_alias_bomb_or_a_huge_file_is_refused_at_once(tmp_path: Path) -> None:
    # Prepare: 300 bytes of nested aliases expand to 9^8 values when walked
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefg", "bcdefgh", strict=True):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\n")
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (2 << 20) + "\n")
    # Execute / Assert
    with pytest.raises(ManifestError, match="aliases are expanded"):
        load_manifest(bomb)
    with pytest.raises(ManifestError, match="a manifest is at most"):
        load_manifest(huge)
