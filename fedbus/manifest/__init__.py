"""The manifest: one validated, frozen model of a federated job, and its per-node topic wiring.

``load_manifest`` is the one place a manifest is read; every mistake becomes one
``ManifestError`` naming the file, the dotted field (``nodes[3].parent``) and what is allowed.

Environment variables: any string value may use ``${VAR}`` or ``${VAR:-default}`` (the default
is used when VAR is unset or empty, as in sh and compose); ``$$`` is a literal ``$``. An unset
VAR without a default is an error. Typed fields (``broker.port: ${PORT:-1883}``) convert the
expanded text to their type; inside free-form ``params`` an expanded value is read as a YAML
scalar, so ``epochs: ${EPOCHS:-2}`` is the integer 2. An optional field that expands to the
empty string (``username: ${USER_NAME:-}``) is unset. Mapping keys are never expanded.

The package: ``model`` (the frozen specs), ``parse`` (one module per section, ``loader`` calling
them in order), ``_yaml`` (safe YAML and ``${VAR}`` expansion), ``wiring`` (who publishes and
subscribes where) and ``describe`` (what ``fedbus validate`` prints).
"""

from __future__ import annotations

from fedbus.manifest.describe import describe
from fedbus.manifest.model import (
    ROLES,
    BrokerNode,
    BrokerSpec,
    CheckpointSpec,
    CodecSpec,
    EvalSpec,
    GroupSpec,
    Manifest,
    NodeSpec,
    PluginSpec,
    PopulationSpec,
    RoundSpec,
    SecuritySpec,
    StoreSpec,
    TaskSpec,
    broker_address,
    thaw,
    with_broker,
    with_node_broker,
)
from fedbus.manifest.parse import load_manifest, parse_manifest
from fedbus.manifest.wiring import Wiring, compile_wiring, feeds_sketches, store_feed

__all__ = [
    "ROLES",
    "BrokerNode",
    "BrokerSpec",
    "CheckpointSpec",
    "CodecSpec",
    "EvalSpec",
    "GroupSpec",
    "Manifest",
    "NodeSpec",
    "PluginSpec",
    "PopulationSpec",
    "RoundSpec",
    "SecuritySpec",
    "StoreSpec",
    "TaskSpec",
    "Wiring",
    "broker_address",
    "compile_wiring",
    "describe",
    "feeds_sketches",
    "load_manifest",
    "parse_manifest",
    "store_feed",
    "thaw",
    "with_broker",
    "with_node_broker",
]
