"""The one JSON error shape of Lookout's own API (the Prometheus API keeps its own):

{"error": {"status": 400, "code": "bad_request", "message": "..."}}
"""

from __future__ import annotations

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
