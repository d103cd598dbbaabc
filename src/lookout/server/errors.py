"""The one JSON error shape of Lookout's own API (the Prometheus API keeps its own):

{"error": {"status": 400, "code": "bad_request", "message": "..."}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from starlette.responses import JSONResponse


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "code": code, "message": message}},
        status_code=status,
        headers=dict(headers or {}),
    )


def finite(value: object) -> object:
    """JSON has no NaN or Infinity: write them as Prometheus's API does, as strings."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if value in (float("inf"), float("-inf")):
            return "+Inf" if value > 0 else "-Inf"
        return value
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


class FiniteJSONResponse(JSONResponse):
    """A JSONResponse that cannot fail on NaN or Infinity in stored data."""

    def render(self, content: object) -> bytes:
        return super().render(finite(content))
