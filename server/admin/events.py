"""The event page (``/admin/events/{seq}``) and the delivery page (``/admin/deliveries/{id}``),
with the delivery's "Replay this delivery" form.

A replay from here is ``onetag replay --id N``: only a dead delivery, or an expired one whose
visitor has an email by now, is made due again (the CLI's ``refusal`` says why not for any
other state). When the Dead letters page keeps a record of replays it sets
``console.replay_recorder``, which is then told of each one.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from .. import cli
from .web import PREFIX, SECURITY_HEADERS, Console, now_ms

MAX_ID = 2 ** 63 - 1  # the stores' largest integer (SQLite's, PostgreSQL's bigint): no larger id exists


def routes(console: Console) -> list[Route]:
    def not_found(request: Request, what: str) -> Response:
        return console.render(request, "admin/message.html", status_code=404,
                              heading="Not found", message=f"There is no {what}.")

    async def event_page(request: Request) -> Response:
        """The stored event as sent and as normalised, its session and identity, and the
        deliveries planned from it."""
        seq = request.path_params["seq"]
        reads = console.reads()
        found = await reads.event(seq) if seq <= MAX_ID else None
        if found is None:
            return not_found(request, f"event with seq {seq}")
        deliveries = await reads.deliveries_of_events([seq])
        return console.render(request, "admin/event.html", event=found, deliveries=deliveries)

    async def delivery_page(request: Request, status_code: int = 200,
                            message: str | None = None) -> Response:
        """The delivery row, what it was planned to send, and every attempt kept: the
        request as sent beside the vendor's answer."""
        delivery_id = request.path_params["id"]
        found = await console.reads().delivery(delivery_id) if delivery_id <= MAX_ID else None
        if found is None:
            return not_found(request, f"delivery #{delivery_id}")
        attempts = await console.store.attempts(delivery_id)
        replayed = request.query_params.get("replayed")
        if message is None and replayed is not None and replayed.isdigit():
            message = (f"Replayed: delivery #{delivery_id} is due again; the forwarder sends "
                       "it within seconds." if replayed != "0" else
                       "Nothing was replayed: the delivery was no longer in a state that can be.")
        return console.render(request, "admin/delivery.html", status_code=status_code,
                              delivery=found, attempts=attempts, message=message,
                              replayable=found["state"] in cli.REPLAYABLE)

    async def replay(request: Request) -> Response:
        """POST: make this one delivery due again (dead, or expired with an email now)."""
        await console.form(request)
        delivery_id = request.path_params["id"]
        if delivery_id > MAX_ID:
            return not_found(request, f"delivery #{delivery_id}")
        rows = await console.store.list_deliveries(ids=[delivery_id], limit=1)
        if not rows:
            return not_found(request, f"delivery #{delivery_id}")
        row = rows[0]
        if row["state"] not in cli.REPLAYABLE:
            return await delivery_page(request, 409, "Not replayed: " + cli.refusal(row))
        made = await console.store.replay_rows(now_ms(), states=[row["state"]], ids=[delivery_id])
        if console.replay_recorder is not None:
            await console.replay_recorder(request, made, {"ids": [delivery_id],
                                                          "states": [row["state"]]})
        return RedirectResponse(f"{PREFIX}/deliveries/{delivery_id}?replayed={len(made)}", 303,
                                headers=SECURITY_HEADERS)

    return [
        console.route("/events/{seq:int}", event_page),
        console.route("/deliveries/{id:int}", delivery_page),
        console.route("/deliveries/{id:int}/replay", replay, methods=["POST"]),
    ]
