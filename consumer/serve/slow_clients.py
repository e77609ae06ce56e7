"""Connections that send slowly are closed: uvicorn's HTTP protocol with two deadlines.

uvicorn closes a connection idle between requests (timeout_keep_alive) and answers 503
past a number of connections (limit_concurrency), but a client that sends its headers a byte
at a time, or its body, or nothing at all after connecting, holds its connection as long as
it likes (slowloris): enough of them and no one else gets in. So each request must arrive in
time: its headers within SMSQ_HTTP_HEADER_TIMEOUT seconds of its first byte (of the
connection, for the first request), then its body within SMSQ_HTTP_BODY_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

_TOO_SLOW = b"request sent too slowly\n"
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
                    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(_TOO_SLOW), _TOO_SLOW))


class SlowClientGuard(H11Protocol):
    """H11Protocol with a deadline on each request's headers, then on its body."""

    header_timeout = 10.0
    body_timeout = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.deadline: asyncio.TimerHandle | None = None
        self.waiting_for: str | None = None
        self._expect("headers")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.IDLE:  # a request begun, its headers not all there yet
            self._expect("headers")
        elif state is h11.SEND_BODY:
            self._expect("body")
        else:  # the whole request is in; uvicorn's keep-alive timeout takes over
            self._expect(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._expect(None)
        super().connection_lost(exc)

    def _expect(self, part: str | None) -> None:
        """Start the deadline of `part` unless it runs already (None: no deadline)."""
        if part == self.waiting_for:
            return
        if self.deadline is not None:
            self.deadline.cancel()
        self.waiting_for, self.deadline = part, None
        if part is not None:
            seconds = self.header_timeout if part == "headers" else self.body_timeout
            self.deadline = self.loop.call_later(seconds, self._too_slow)

    def _too_slow(self) -> None:
        if self.transport.is_closing():
            return
        log.info("connection closed: request sent too slowly", extra={
            "action": "http_request_too_slow", "waiting_for": self.waiting_for,
            "client": self.client[0] if self.client else ""})
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()


def guarded_protocol(header_timeout: float, body_timeout: float) -> type[SlowClientGuard]:
    """The protocol class for uvicorn.Config(http=...), with these deadlines."""
    return type("SlowClientGuard", (SlowClientGuard,),
                {"header_timeout": header_timeout, "body_timeout": body_timeout})
