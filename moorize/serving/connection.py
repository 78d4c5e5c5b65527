"""The server's connections on uvicorn: a deadline for request headers, and a shutdown that drains.

uvicorn closes idle keep-alive connections, but a client that opens a connection and
sends its headers slowly (or never finishes them, "slowloris") is held as long as it
likes; ``TimedH11Protocol`` gives every request's headers ``header_timeout`` seconds,
then answers 408 and closes. The body's deadline is the app's (``app.Server.body``):
uvicorn calls the app once the headers are in.

``DrainingServer`` is uvicorn's server whose shutdown first drains the engine, so a
stream still running at the end of the grace period ends with an error event and
``[DONE]`` (a plain request with 503) instead of being cancelled mid-chunk.
"""

from __future__ import annotations

import json
import logging

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def _timeout_answer(seconds: float) -> bytes:
    body = json.dumps({"error": {"message": f"the request headers did not arrive within {seconds:g} s",
                                 "type": "invalid_request_error", "param": None, "code": "request_timeout"}}).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers (from the connection's first byte or
    the previous response)."""

    header_timeout: float = 10.0
    _headers_due = None  # the armed deadline's timer handle

    @classmethod
    def with_timeout(cls, seconds: float) -> type[TimedH11Protocol]:
        """The protocol class for one server's ``--header-timeout`` (uvicorn takes a class, not an instance)."""
        return type(cls.__name__, (cls,), {"header_timeout": seconds})

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers()

    def connection_lost(self, exc) -> None:
        self._unwatch_headers()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _watch_headers(self) -> None:
        """Arm the deadline while a request's headers are awaited, disarm it once they are in."""
        if not self._between_requests():
            self._unwatch_headers()
        elif self._headers_due is None:
            self._headers_due = self.loop.call_later(self.header_timeout, self._headers_late)

    def _unwatch_headers(self) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def _headers_late(self) -> None:
        self._headers_due = None
        if self._between_requests() and not self.transport.is_closing():
            log.info("closed a connection whose request headers took over %g s", self.header_timeout)
            self.transport.write(_timeout_answer(self.header_timeout))
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose shutdown first drains the engine: no new requests, running ones may finish within
    ``grace`` seconds, then the engine ends each (an error event and [DONE], or 503)."""

    def __init__(self, config, engine, grace: float):
        super().__init__(config)
        self.engine, self.grace = engine, grace

    async def shutdown(self, sockets=None) -> None:
        if self.engine is not None:
            self.engine.drain(self.grace)
        await super().shutdown(sockets=sockets)
