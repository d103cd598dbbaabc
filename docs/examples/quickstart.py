"""A service instrumented with lookout.sdk: run it with `uvicorn quickstart:app`."""

import os

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import lookout.sdk

log = lookout.sdk.get_logger("quickstart")
tickets_sold = lookout.sdk.counter("tickets_sold_total", "Tickets sold.", ["route"])
SEATS_URL = os.environ.get("SEATS_URL")  # another instance of this service, if any


async def book(request: Request) -> JSONResponse:
    route = request.path_params["route"]
    lookout.sdk.bind(route=route)  # every log line of this request carries route=...
    if SEATS_URL:  # the call carries traceparent and X-Trace-Id: one trace, two services
        async with httpx.AsyncClient() as client:
            (await client.post(f"{SEATS_URL}/book/{route}")).raise_for_status()
    tickets_sold.labels(route=route).inc()
    log.info("ticket_sold")
    return JSONResponse({"route": route, "status": "booked"})


app = lookout.sdk.init(
    service=os.environ.get("OTEL_SERVICE_NAME", "quickstart"),
    app=Starlette(routes=[Route("/book/{route}", book, methods=["POST"])]),
)
