"""A test service that plays the edge or an internal service, set by CHAIN_ROLE.

edge:     GET /api/book/{trip}  -> POST {CHAIN_NEXT}/book/{trip}
internal: POST /book/{trip}     -> POST {CHAIN_THIRD_PARTY}/pay, echoes the headers it got
"""

from __future__ import annotations

import os

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

import lookout.sdk

ROLE = os.environ["CHAIN_ROLE"]
log = lookout.sdk.get_logger("chain")


async def edge_book(request: Request) -> JSONResponse:
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{os.environ['CHAIN_NEXT']}/book/{request.path_params['trip']}")
    log.info("edge_booked")
    return JSONResponse({"internal": answer.json()})


def internal_book(request: Request) -> JSONResponse:
    """A sync endpoint: Starlette runs it in its thread pool, with the request's context."""
    lookout.sdk.bind(trip=request.path_params["trip"])
    with httpx.Client() as client:  # the sync client is instrumented too
        client.post(f"{os.environ['CHAIN_THIRD_PARTY']}/pay", json={"amount": 1})
    log.info("internal_booked")
    return JSONResponse({"headers": dict(request.headers)})


async def healthz(_: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


routes = [Route("/healthz", healthz)]
if ROLE == "edge":
    routes.append(Route("/api/book/{trip}", edge_book))
else:
    routes.append(Route("/book/{trip}", internal_book, methods=["POST"]))

app = lookout.sdk.init(
    service=f"chain-{ROLE}",
    app=Starlette(routes=routes),
    trust_inbound_context=ROLE != "edge",
)
