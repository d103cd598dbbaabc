"""The in-process server of tests/server, for the HTTP-level properties."""

from __future__ import annotations

from tests.server.conftest import served

__all__ = ["served"]
