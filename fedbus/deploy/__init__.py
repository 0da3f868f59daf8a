"""Deployment generated from a manifest: broker security, certificates, compose, systemd.

One module a concern: ``passwords`` and ``security`` (users and rights for mosquitto),
``certs`` (CA and per-node certificates), ``local`` (a locked-down local broker for tests).
"""

from fedbus.deploy.certs import CertFiles, write_certs
from fedbus.deploy.local import SecureMosquitto, spawn_secure_mosquitto
from fedbus.deploy.security import SecurityFiles, TlsFiles, write_broker_security

__all__ = [
    "CertFiles",
    "SecureMosquitto",
    "SecurityFiles",
    "TlsFiles",
    "spawn_secure_mosquitto",
    "write_broker_security",
    "write_certs",
]
