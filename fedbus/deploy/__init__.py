"""Deployment generated from a manifest: broker security, certificates, compose, systemd.

One module a concern: ``passwords`` and ``security`` (users and rights for mosquitto),
``certs`` (CA and per-node certificates), ``compose`` (docker compose), ``units`` (systemd),
``health`` (container healthchecks), ``local`` (a locked-down local broker for tests).
Import the module you need: a node that only serves never loads the deployment code.
"""
