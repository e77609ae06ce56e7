"""The sandbox over HTTP: Twilio's paths, the control paths under /_fake/, and a server.

Stdlib `ThreadingHTTPServer` speaking HTTP/1.1 keep-alive, chosen over uvicorn because a fault
must be able to close the TCP connection without any response, which ASGI cannot express.
"""

from __future__ import annotations

import io
import json
import logging
import math
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from consumer.sandbox.api import API_VERSION, FakeTwilio
from consumer.sandbox.faults import FaultError, FaultRule, Reply, error_reply

log = logging.getLogger(__name__)


# The kernel's receive time of each packet (CLOCK_REALTIME), read with the data: Linux's
# SO_TIMESTAMPNS, which the socket module does not name. Elsewhere, Python's clock on reading.
_SO_TIMESTAMPNS = 35 if sys.platform == "linux" else None
_TIMESTAMP_SPACE = socket.CMSG_SPACE(struct.calcsize("ll"))


class _ArrivalStampedSocketIO(socket.SocketIO):
    """The connection's raw reader, keeping when the kernel received the first bytes read.

    A request's arrival is stamped by the kernel, not when a busy Python thread gets round to
    it: with hundreds of connections the GIL delays that by tens of milliseconds, which would
    make two requests that left a second apart look closer than they were.
    """

    first_arrival: float | None = None  # time.monotonic() of the first packet since reset

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, "rb")
        self.sock = sock

    def readinto(self, buffer: Any) -> int:  # any writable buffer, as socket.SocketIO takes
        size, ancillary, _flags, _address = self.sock.recvmsg_into([buffer], _TIMESTAMP_SPACE)
        if self.first_arrival is None:
            self.first_arrival = _monotonic_of(ancillary)
        return size


def _monotonic_of(ancillary: list[tuple[int, int, bytes]]) -> float:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
            seconds, nanoseconds = struct.unpack("ll", data[:struct.calcsize("ll")])
            return seconds + nanoseconds / 1e9 - _realtime_minus_monotonic()
    return time.monotonic()


def _realtime_minus_monotonic() -> float:
    """The kernel's stamp is CLOCK_REALTIME. Python cannot read two clocks at once, and a
    busy sandbox may switch threads between the two reads, which skewed arrivals by up to
    ~10 ms (early or late); of three bracketed readings, the tightest bracket wins."""
    best_width, best_offset = math.inf, 0.0
    for _ in range(3):
        before = time.monotonic()
        realtime = time.time()
        after = time.monotonic()
        if after - before < best_width:
            best_width, best_offset = after - before, realtime - (before + after) / 2
    return best_offset


class Handler(BaseHTTPRequestHandler):
    """Routes one request to the FakeTwilio of its server; keep-alive, one write per answer."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small answers must not wait for the client's delayed ACK
    server: FakeTwilioHTTPServer

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced by a reader that keeps the kernel's receive times
        self.raw_reader = _ArrivalStampedSocketIO(self.connection)
        self.rfile = io.BufferedReader(self.raw_reader)

    def handle_one_request(self) -> None:
        self.raw_reader.first_arrival = None  # the next read is this request's first packet
        super().handle_one_request()

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if url.path.startswith("/_fake/"):
            self._answer(self._control(fake, method, url.path, url.query, body))
            return
        reply = self._api(fake, method, url.path, url.query, body)
        delay = fake.latency() + reply.delay
        if delay > 0:  # even sleep(0) costs a GIL round trip, a third of a fast request
            time.sleep(delay)
        if reply.drop:
            self.close_connection = True  # the socket is closed with nothing written
            return
        self._answer(reply)

    def _api(self, fake: FakeTwilio, method: str, path: str, query: str, body: bytes) -> Reply:
        if not path.startswith(f"/{API_VERSION}/Accounts/"):
            return error_reply(404, 20404, f"The requested resource {path} was not found")
        if not fake.authorised(self.headers.get("Authorization")):
            return error_reply(401, 20003, "Authenticate")
        prefix = fake.messages_uri
        if method == "POST" and path == f"{prefix}.json":
            return fake.create(parse_qs(body.decode(), keep_blank_values=True),
                               arrived=self.raw_reader.first_arrival)
        refused = fake.account_refusal(path)  # creates meet their fault rules in create()
        if refused is not None:
            return refused
        if method == "GET" and path == f"{prefix}.json":
            return fake.list_messages(parse_qs(query, keep_blank_values=True))
        if method == "GET" and path.startswith(f"{prefix}/") and path.endswith(".json"):
            return fake.fetch(path[len(prefix) + 1:-len(".json")], path)
        return error_reply(404, 20404, f"The requested resource {path} was not found")

    @staticmethod
    def _control(fake: FakeTwilio, method: str, path: str, query: str, body: bytes) -> Reply:
        try:
            payload = json.loads(body) if body else {}
            if path == "/_fake/messages" and method in ("GET", "DELETE"):
                if method == "DELETE":
                    fake.clear()
                after = int(parse_qs(query).get("after", ["0"])[0])
                return Reply(200, {"messages": fake.received(after)})
            if path == "/_fake/faults" and method in ("GET", "POST", "DELETE"):
                if method != "GET":
                    specs = payload if isinstance(payload, list) else [payload] if payload else []
                    fake.set_faults([FaultRule.from_dict(s) for s in specs])
                return Reply(200, {"faults": fake.faults()})
            if path == "/_fake/config" and method in ("GET", "POST"):
                return Reply(200, fake.configure(payload))
            if path == "/_fake/opted-out" and method in ("GET", "POST"):
                return Reply(200, {"opted_out": fake.opt_out(
                    _numbers(payload, "add"), _numbers(payload, "remove"))})
            if path == "/_fake/stats" and method == "GET":
                return Reply(200, fake.all_stats())
            if path == "/_fake/callbacks" and method == "GET":
                return Reply(200, {"callbacks": fake.callbacks.entries()})
        except (FaultError, TypeError, ValueError) as exc:
            return Reply(400, {"error": str(exc)})
        return Reply(404, {"error": f"no {method} {path}"})

    def _answer(self, reply: Reply) -> None:
        if isinstance(reply.body, str):  # a proxy's error page
            content, content_type = reply.body.encode(), "text/html"
        else:
            content, content_type = json.dumps(reply.body).encode(), "application/json"
        head = [f"HTTP/1.1 {reply.status} {self.responses.get(reply.status, ('',))[0]}",
                f"Content-Type: {content_type}; charset=utf-8",
                f"Content-Length: {len(content)}",
                *(f"{name}: {value}" for name, value in reply.headers.items())]
        if self.close_connection:
            head.append("Connection: close")
        try:
            self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + content)
        except OSError:  # the client gave up first (e.g. its read timeout on a slow answer)
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib's name
        log.debug(format, *args, extra={"action": "fake_twilio_request"})


class FakeTwilioHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # 100+ clients connect at once; the default backlog is 5

    def __init__(self, address: tuple[str, int], fake: FakeTwilio) -> None:
        self.fake = fake
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # Set on the listening socket, so that every accepted connection has it from its
        # first packet on (set after accept(), that packet would have no stamp).
        if _SO_TIMESTAMPNS is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        super().server_bind()

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        """A client that goes away (a dispatcher killed mid-request) is routine, not a traceback
        on stderr; anything else is logged as the bug it is."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("client %s went away", client_address, extra={"action": "fake_client_gone"})
            return
        log.exception("fake Twilio failed to answer %s", client_address,
                      extra={"action": "fake_request_failed"})


def _numbers(payload: object, key: str) -> list[str]:
    numbers = payload.get(key, []) if isinstance(payload, dict) else []
    if not isinstance(numbers, list) or not all(isinstance(n, str) for n in numbers):
        raise ValueError(f"{key}: must be a list of phone numbers")
    return numbers


class FakeTwilioServer:
    """The fake, running in this process on its own threads (tests, benchmarks).

        with FakeTwilioServer() as server:
            client = Client(server.fake.account_sid, ..., http_client=...(server.url))
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **options: object) -> None:
        self.fake = FakeTwilio(**options)  # type: ignore[arg-type]
        self.http = FakeTwilioHTTPServer((host, port), self.fake)
        self._thread = threading.Thread(target=self.http.serve_forever, name="fake-twilio",
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.http.server_address[:2]
        assert isinstance(host, str)  # an AF_INET address: (host, port)
        return f"http://{host}:{port}"

    def start(self) -> FakeTwilioServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.fake.callbacks.stop()

    def __enter__(self) -> FakeTwilioServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
