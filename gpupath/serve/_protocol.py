"""uvicorn's h11 protocol with deadlines on half-sent requests (slowloris).

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but a connection whose
request headers (or body) arrive a few bytes at a time, or stop half-way, is kept open for ever:
measured, 1,500 such connections stayed open past 65 s, before any token check, enough to starve a
``--host 0.0.0.0 --token`` server of file descriptors. Here every request must have all its headers
within ``HEADER_TIMEOUT_S`` of its first byte (or of the connection, for the first one) and its body
within ``BODY_TIMEOUT_S`` after them; a connection past a deadline is closed.

The deadline follows h11's view of the client: waiting for headers (``IDLE`` with bytes buffered, or
a fresh connection), sending a body (``SEND_BODY``), done. Responses and idle keep-alive are
uvicorn's as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["DeadlineH11Protocol", "HEADER_TIMEOUT_S", "BODY_TIMEOUT_S"]

HEADER_TIMEOUT_S = 10.0   # a request's headers, from its first byte (a browser sends them in one packet)
BODY_TIMEOUT_S = 30.0     # its body after the headers (the API takes no uploads; GET bodies are empty)


class DeadlineH11Protocol(H11Protocol):
    """H11Protocol that closes connections whose request headers or body do not arrive in time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: object = None   # the h11 client state the armed deadline is for

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(h11.IDLE, HEADER_TIMEOUT_S)  # the first request's headers

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # idle keep-alive is uvicorn's timer; the next request's first byte arms ours again

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _follow(self) -> None:
        """Arm, move or drop the deadline after new bytes, by where the client's request stands."""
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._waiting_for is not h11.IDLE and self.conn.trailing_data[0]:
                self._arm(h11.IDLE, HEADER_TIMEOUT_S)  # part of the next request's headers
        elif state is h11.SEND_BODY:
            if self._waiting_for is not h11.SEND_BODY:
                self._arm(h11.SEND_BODY, BODY_TIMEOUT_S)
        else:
            self._disarm()  # the request is in; the response is the app's

    def _arm(self, state: object, seconds: float) -> None:
        self._disarm()
        self._waiting_for = state
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._waiting_for = None, None

    def _expired(self) -> None:
        self._deadline, self._waiting_for = None, None
        if not self.transport.is_closing() and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self.transport.close()
