"""Deployment generated from a manifest: broker security, certificates, compose, systemd.

One module a concern: ``passwords`` and ``security`` (users and rights for mosquitto),
``certs`` (CA and per-node certificates), ``compose`` (docker compose), ``units`` (systemd),
``health`` (container healthchecks), ``local`` (a locked-down local broker for tests).
"""

from fedbus.deploy.certs import CertFiles, write_certs
from fedbus.deploy.compose import compose_config, compose_yaml
from fedbus.deploy.local import SecureMosquitto, spawn_secure_mosquitto
from fedbus.deploy.security import SecurityFiles, TlsFiles, write_broker_security
from fedbus.deploy.units import UnitFiles, write_unit

__all__ = [
    "CertFiles",
    "SecureMosquitto",
    "SecurityFiles",
    "TlsFiles",
    "UnitFiles",
    "compose_config",
    "compose_yaml",
    "spawn_secure_mosquitto",
    "write_broker_security",
    "write_certs",
    "write_unit",
]
