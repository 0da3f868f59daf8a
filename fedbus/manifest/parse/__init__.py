"""Manifest data -> the frozen model: one module per section, each a function of a ``Reader``;
``loader`` reads the file and calls them in order.
"""

from __future__ import annotations

from fedbus.manifest.parse.loader import load_manifest, parse_manifest

__all__ = ["load_manifest", "parse_manifest"]
