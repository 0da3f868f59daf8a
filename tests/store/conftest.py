"""Fixtures for the store's tests."""

from __future__ import annotations





