"""The Twilio adapter: the official `twilio` client, and every outcome turned into a TwilioAttempt.

This is the only module that knows the twilio library. It adds what the library leaves to its
user:

- the base URL from TWILIO_API_URL (a sandbox such as `smsq fake-twilio`), by setting the
  `api` domain's base_url, which is how the library builds every Messages URL;
- an HTTP client on urllib3 alone (the library's own is on requests, which was most of a
  send's CPU), with explicit (connect, read) timeouts, no transport retries, and a pool that
  holds as many connections as the dispatcher has threads, closed once idle for 15 s;
- the response of the current thread kept aside, because the library's exception does not
  carry headers and a 429's Retry-After is in a header;
- the classification the status table needs: did the request leave before the failure?
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
import time
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote, urlencode
from uuid import UUID

import urllib3
import urllib3.connection
import urllib3.exceptions
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http import HttpClient
from twilio.http.response import Response
from twilio.rest import Client

from consumer.dispatch.outcomes import TwilioAttempt
from consumer.pipeline import CALLBACK_OVERRIDES
from consumer.settings import SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN, Settings

# Reconciliation looks this far before the claim, for clocks that disagree a little (Twilio's
# dates have whole seconds). Small on purpose: an earlier message with the same text must
# not be taken for ours.
CLOCK_SLACK = timedelta(seconds=5)
RECONCILE_PAGE = 50
PRICE_PAGE = 1000  # the most Twilio's Messages list gives in one page
# A keep-alive connection to Twilio unused this long is closed. A burst opens up to
# SMSQ_DISPATCH_CONCURRENCY of them, and without this they stay open for good, one file
# descriptor each, as many as the busiest moment ever needed. Well under the idle time
# after which a server or load balancer closes them (60 s is common), so a request is not
# written to a connection the server is closing, which would leave its outcome unknown.
# httpx closes after 5 s and aiohttp after 15; a sender at one message a second reuses its
# connection long before.
KEEPALIVE_EXPIRY_SECONDS = 15.0
# What a trial account puts before every body it sends.
TRIAL_PREFIX = "Sent from your Twilio trial account - "
# Twilio keeps a message in its queue at most this long (ValidityPeriod, error 21624).
MAX_VALIDITY_SECONDS = 36_000
# The library's base client wants a logger for its request logging, which ours never calls.
_HTTP_LOG = logging.getLogger("consumer.dispatch.twilio_client.http")


@dataclass(frozen=True)
class Outgoing:
    """One message as it leaves: what Twilio's Messages create needs."""

    to: str
    sender_address: str  # a From number, or a Messaging Service SID (MG...)
    body: str
    media_url: tuple[str, ...] = ()
    media_token: str | None = None  # hosted temporary media, served by `smsq serve`
    notification_id: UUID | None = None  # named in the status callback URL
    expire_datetime: datetime | None = None  # becomes ValidityPeriod


@dataclass(frozen=True)
class FoundMessage:
    sid: str
    segments: int | None
    date_created: datetime | None

    @property
    def order(self) -> tuple[datetime, str]:
        """Oldest first, then by SID: the same answer however Twilio ordered its pages."""
        return (self.date_created or datetime.max.replace(tzinfo=timezone.utc), self.sid)


@dataclass(frozen=True)
class Priced:
    """A message whose price Twilio has filled in: positive, in `unit` (e.g. USD)."""

    sid: str
    price: Decimal
    unit: str


class MissingPublicUrl(Exception):
    """Hosted media needs SMSQ_PUBLIC_URL: Twilio must be able to fetch it from us."""


@dataclass(frozen=True)
class _Leaving:
    """What the current thread's next request does as it leaves: waits until `not_before`,
    is called back if `withhold()` says so then, and tells `notify` when it left."""

    notify: Callable[[float], None] | None = None
    not_before: float | None = None
    withhold: Callable[[], bool] | None = None


_departure = threading.local()  # .leaving: the current thread's next request, or None


class RequestWithheld(urllib3.exceptions.HTTPError):
    """The request was called back before any byte of it left (see TwilioSender.send)."""


class _DepartureStamped:
    """Writes each request in one piece, no earlier than the thread's `not_before` (when its
    tokens are there), and calls the thread's departure callback with time.monotonic() once
    it is in the kernel.

    One piece: http.client writes the head and urllib3 then the body, two packets, the second
    as late as a wait for the GIL; Twilio takes a message once its whole request is in, so a
    departure stamped at the head was up to ~15 ms early. Stamped after the write, not before,
    because the thread may wait for the GIL between any two lines of Python: a stamp taken
    before would sometimes be milliseconds early, one taken after is never early."""

    _holding_head = False  # in request(), with a body to come: the head waits for it
    _head: bytes | None = None

    def request(self, method: str, url: str, body: Any = None, *args: Any,
                **kwargs: Any) -> None:
        self._holding_head = body is not None
        try:
            super().request(method, url, body, *args, **kwargs)  # type: ignore[misc]
            head = self._head  # still waiting after an empty body: it goes alone
        finally:  # after an error, a head still waiting is dropped, never sent
            self._head, self._holding_head = None, False
        if head is not None:
            self._write(head)

    def send(self, data: Any) -> None:
        if self._holding_head:
            if self._head is None:
                self._head = bytes(data)
                return
            data, self._head, self._holding_head = self._head + bytes(data), None, False
        self._write(data)

    def _write(self, data: Any) -> None:
        leaving, _departure.leaving = getattr(_departure, "leaving", None), None
        if leaving is None:  # not a request of TwilioSender.send, or not its first write
            super().send(data)  # type: ignore[misc]  # urllib3's connection, after this in MRO
            return
        wait = 0.0 if leaving.not_before is None else leaving.not_before - time.monotonic()
        if wait > 0:  # not sleep(0): that hands the GIL to another thread and waits for it back
            time.sleep(wait)
        if leaving.withhold is not None and leaving.withhold():
            raise RequestWithheld("called back before it left")
        super().send(data)  # type: ignore[misc]
        if leaving.notify is not None:
            leaving.notify(time.monotonic())

    def _tunnel(self) -> None:
        # The CONNECT to a proxy is not the request: it goes at once, unstamped, and the
        # request's own first bytes are held and stamped.
        leaving, _departure.leaving = getattr(_departure, "leaving", None), None
        holding, self._holding_head = self._holding_head, False
        try:
            super()._tunnel()  # type: ignore[misc]
        finally:
            _departure.leaving, self._holding_head = leaving, holding


class _StampedHTTPConnection(_DepartureStamped, urllib3.connection.HTTPConnection):
    pass


class _StampedHTTPSConnection(_DepartureStamped, urllib3.connection.HTTPSConnection):
    pass


class _ExpiringKeepAlive:
    """A connection pool whose connections are closed once idle KEEPALIVE_EXPIRY_SECONDS.

    urllib3 keeps every connection given back until the pool is cleared. Two checks, as
    aiohttp and httpcore make them: a connection taken for a request after lying idle that
    long is closed first (it connects again before any byte of the request leaves), and
    `close_idle`, which the dispatcher calls every second, closes those lying in the pool:
    the pool is last in, first out, so under a steady load the connections a burst opened
    lie idle at its bottom. A closed connection stays in the pool and connects again when
    next taken, as urllib3 does with one the server dropped. This leans on urllib3 2's pool
    being a queue.LifoQueue (its `queue` and `mutex`)."""

    keepalive_expiry = KEEPALIVE_EXPIRY_SECONDS

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        if _expired(conn, time.monotonic() - self.keepalive_expiry):
            conn.close()
        return conn

    def _put_conn(self, conn: Any) -> None:
        if conn is not None:
            conn.smsq_idle_since = time.monotonic()
        super()._put_conn(conn)  # type: ignore[misc]

    def close_idle(self) -> None:
        pool = self.pool  # type: ignore[attr-defined]
        if pool is None:  # the pool was closed
            return
        cutoff = time.monotonic() - self.keepalive_expiry
        with pool.mutex:  # no thread takes a connection while we look
            for conn in pool.queue:
                if _expired(conn, cutoff):
                    conn.close()


def _expired(conn: Any, cutoff: float) -> bool:
    """An open connection given back before `cutoff` (time.monotonic())."""
    return conn is not None and not conn.is_closed and (
        getattr(conn, "smsq_idle_since", cutoff) < cutoff)


class _StampedHTTPPool(_ExpiringKeepAlive, urllib3.HTTPConnectionPool):
    ConnectionCls = _StampedHTTPConnection


class _StampedHTTPSPool(_ExpiringKeepAlive, urllib3.HTTPSConnectionPool):
    ConnectionCls = _StampedHTTPSConnection


class PooledHttpClient(HttpClient):
    """The twilio library's HTTP client on urllib3 alone: a pool sized to the concurrency,
    no transport retries, and the last response of each thread. requests under the library's
    own client was most of a send's CPU (preparing, merging settings, hooks, cookies)."""

    def __init__(self, base_url: str, pool_size: int, connect_timeout: float,
                 read_timeout: float) -> None:
        super().__init__(_HTTP_LOG, is_async=False)
        # No transport retries: a blind retry of a POST is exactly a possible double send.
        self.pool = _pool_manager(base_url, maxsize=pool_size, block=False, retries=False)
        self.timeouts = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self.pool.pool_classes_by_scheme = {"http": _StampedHTTPPool,
                                            "https": _StampedHTTPSPool}
        self._local = threading.local()

    def request(self, method: str, url: str, params: dict[str, object] | None = None,
                data: dict[str, object] | None = None, headers: dict[str, str] | None = None,
                auth: tuple[str, str] | None = None, timeout: float | None = None,
                allow_redirects: bool = False) -> Response:
        self._local.response = None
        headers = dict(headers or {})
        if auth is not None:
            headers["Authorization"] = _basic_authorization(*auth)
        if params:  # the paging URLs come whole, with their query
            url += ("&" if "?" in url else "?") + urlencode(params, doseq=True)
        # Redirects are never followed (the library asks for none): following one would
        # send the request again.
        answer = self.pool.urlopen(method.upper(), url, body=_body_of(data, headers),
                                   headers=headers, redirect=False,
                                   timeout=self.timeouts if timeout is None else timeout)
        response = Response(answer.status, answer.data.decode("utf-8", "replace"),
                            answer.headers)
        self._local.response = response
        return response

    @property
    def last_response(self) -> Response | None:
        return getattr(self._local, "response", None)

    def close_idle(self) -> None:
        """Close the keep-alive connections idle KEEPALIVE_EXPIRY_SECONDS or longer."""
        for key in self.pool.pools.keys():
            pool = self.pool.pools.get(key)
            if isinstance(pool, _ExpiringKeepAlive):
                pool.close_idle()

    def close(self) -> None:
        self.pool.clear()


def _pool_manager(base_url: str, **options: Any) -> urllib3.PoolManager:
    """A ProxyManager when the standard proxy variables (HTTPS_PROXY, NO_PROXY, ...) send
    `base_url` through a proxy. They are read once, here: looking them up on every request
    was a quarter of a request's CPU time with requests."""
    target = urllib3.util.parse_url(base_url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(target.scheme or "http") or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(target.netloc or ""):
        return urllib3.PoolManager(**options)
    credentials = urllib3.util.parse_url(proxy).auth
    proxy_headers = (urllib3.util.make_headers(proxy_basic_auth=unquote(credentials))
                     if credentials else None)
    return urllib3.ProxyManager(proxy, proxy_headers=proxy_headers, **options)


@functools.lru_cache(maxsize=4)
def _basic_authorization(username: str, password: str) -> str:
    """HTTP Basic auth as requests writes it (latin-1); computed once for the account's pair."""
    return "Basic " + b64encode(f"{username}:{password}".encode("latin-1")).decode("ascii")


def _body_of(data: dict[str, object] | None, headers: dict[str, str]) -> bytes | None:
    """The request body as requests wrote it for the library: JSON for the JSON content
    types, otherwise a form in which a list repeats its key (MediaUrl=a&MediaUrl=b)."""
    if not data:
        return None
    if headers.get("Content-Type") in ("application/json", "application/scim+json"):
        return json.dumps(data).encode()
    return urlencode(data, doseq=True).encode()


class TwilioSender:
    """Sends messages and finds them again; safe to call from many threads at once."""

    def __init__(self, settings: Settings, pool_size: int) -> None:
        base_url = str(settings.twilio_api_url).rstrip("/")
        self.http = PooledHttpClient(base_url, pool_size, settings.smsq_twilio_connect_timeout,
                                     settings.smsq_twilio_read_timeout)
        token = settings.twilio_auth_token
        self.client = Client(
            username=settings.twilio_account_sid or SANDBOX_ACCOUNT_SID,
            password=token.get_secret_value() if token else SANDBOX_AUTH_TOKEN,
            http_client=self.http,
            environment={},  # no TWILIO_EDGE / TWILIO_REGION from the environment
        )
        self.client.api.base_url = base_url
        public = str(settings.smsq_public_url).rstrip("/") if settings.smsq_public_url else None
        self.public_url = public
        self.status_callback = f"{public}/twilio/status" if public else None

    def send(self, message: Outgoing, on_departure: Callable[[float], None] | None = None,
             not_before: float | None = None,
             withhold: Callable[[], bool] | None = None) -> TwilioAttempt:
        """Create the message at Twilio; never raises for anything Twilio or the network does.
        The request leaves no earlier than `not_before` (time.monotonic()), and not at all if
        `withhold()` says so then (TwilioAttempt.withheld); `on_departure` is called with
        time.monotonic() as it leaves."""
        params = self._create_params(message)
        _departure.leaving = _Leaving(on_departure, not_before, withhold)
        try:
            created = self.client.messages.create(**params)
        except TwilioRestException as exc:  # the legacy error body
            return TwilioAttempt(request_sent=True, http_status=exc.status, error_code=exc.code,
                                 error_message=exc.msg, retry_after=self._retry_after())
        except TwilioServiceException as exc:  # the RFC 9457 problem body of newer APIs
            return TwilioAttempt(request_sent=True, http_status=exc.status, error_code=exc.code,
                                 error_message=exc.detail or exc.title,
                                 retry_after=self._retry_after())
        except RequestWithheld:
            return TwilioAttempt(request_sent=False, withheld=True,
                                 error_message="called back before it left")
        except urllib3.exceptions.HTTPError as exc:
            # Still set: the request's first write never came (a TLS handshake or a proxy's
            # tunnel failed before it), so no byte of it left, whatever the error.
            unwritten = getattr(_departure, "leaving", None) is not None
            return TwilioAttempt(request_sent=not unwritten and _left_before_failure(exc),
                                 error_message=f"{type(exc).__name__}: {exc}")
        finally:
            _departure.leaving = None
        status = self.http.last_response.status_code if self.http.last_response else 201
        return TwilioAttempt(request_sent=True, http_status=status, sid=created.sid,
                             segments=_int_or_none(created.num_segments))

    def find_sent(self, message: Outgoing, since: datetime) -> list[FoundMessage]:
        """Messages Twilio holds that may be `message`, created at or after `since`, oldest
        first: to that number, from that sender, with exactly that body.

        Two views of the Messages list, because neither alone sees every message: the one
        filtered by DateSent (a GMT date, as Twilio documents it) finds messages sent since,
        however many came after them; the unfiltered one, newest first, finds those still
        queued, whose date_sent is null until Twilio sends them. The caller skips SIDs it has
        recorded already. Raises on network or API errors.
        """
        after = since - CLOCK_SLACK
        # A string: the library would write a date object as a datetime.
        sent_since = after.astimezone(timezone.utc).date().isoformat()
        found = {m.sid: m for m in self._matching(message, after, date_sent_after=sent_since)}
        found.update((m.sid, m) for m in self._matching(message, after))
        return sorted(found.values(), key=lambda m: m.order)

    def prices_sent_since(self, day: date) -> Iterator[Priced]:
        """The prices of the messages Twilio sent on or after `day` (a GMT date), newest
        first, through the Messages list page by page (one request a page, not one a
        message); those still without a price are skipped. Raises on network or API errors."""
        listed = self.client.messages.stream(date_sent_after=day.isoformat(),
                                             page_size=PRICE_PAGE)
        for message in listed:
            price = _positive_price(message.price)
            if price is not None:
                yield Priced(message.sid, price, (message.price_unit or "USD").upper())

    def _matching(self, message: Outgoing, after: datetime, **filters) -> list[FoundMessage]:
        if not message.sender_address.startswith("MG"):
            filters["from_"] = message.sender_address
        listed = self.client.messages.list(to=message.to, limit=RECONCILE_PAGE, **filters)
        return [FoundMessage(m.sid, _int_or_none(m.num_segments), m.date_created)
                for m in listed if _is_match(m, message, after)]

    def _create_params(self, message: Outgoing) -> dict:
        params: dict = {"to": message.to, "body": message.body}
        if message.sender_address.startswith("MG"):
            params["messaging_service_sid"] = message.sender_address
        else:
            params["from_"] = message.sender_address
        media = list(message.media_url)
        if message.media_token:
            if not self.public_url:
                raise MissingPublicUrl(
                    "hosted media needs SMSQ_PUBLIC_URL, where Twilio fetches it")
            media.append(f"{self.public_url}/media/{message.media_token}")
        if media:
            params["media_url"] = media
        if self.status_callback:
            # Our id in the URL: a callback for a message whose create answer was lost
            # still tells us which notification it is (serve records its SID).
            url = (f"{self.status_callback}?n={message.notification_id}"
                   if message.notification_id else self.status_callback)
            # Twilio's connection overrides: it retries a receipt serve did not take.
            params["status_callback"] = f"{url}#{CALLBACK_OVERRIDES}"
        validity = validity_period(message.expire_datetime, datetime.now(timezone.utc))
        if validity is not None:
            params["validity_period"] = validity
        return params

    def _retry_after(self) -> float | None:
        response = self.http.last_response
        value = response.headers.get("Retry-After") if response is not None else None
        return _seconds_of_retry_after(value) if value else None

    def close_idle(self) -> None:
        self.http.close_idle()

    def close(self) -> None:
        self.http.close()


def validity_period(expire: datetime | None, now: datetime) -> int | None:
    """Twilio's ValidityPeriod for a message that expires at `expire`: Twilio drops it from
    its queue after that many seconds (whole, 1 to 36,000), instead of sending it late."""
    if expire is None:
        return None
    seconds = math.ceil((expire - now).total_seconds())
    return max(1, min(MAX_VALIDITY_SECONDS, seconds))


def _is_match(candidate, message: Outgoing, after: datetime) -> bool:
    created = candidate.date_created or candidate.date_sent
    if created is None or created < after:
        return False
    if message.sender_address.startswith("MG"):
        same_sender = candidate.messaging_service_sid == message.sender_address
    else:
        same_sender = candidate.from_ == message.sender_address
    body = candidate.body or ""
    return same_sender and body in (message.body, TRIAL_PREFIX + message.body)


def _left_before_failure(exc: urllib3.exceptions.HTTPError) -> bool:
    """True unless the connection failed before any byte of the request went out.

    A refused or timed-out connect, to Twilio or to the proxy, is safe to retry. Anything
    else (a read timeout, a TLS or protocol error, a connection reset or closed after the
    request was written) leaves the outcome unknown; the caller knows better when the
    request's first write never came (a TLS handshake failed before it). With retries=False
    urllib3 raises the failure itself, not a MaxRetryError around it.
    """
    failure: Exception = exc
    if isinstance(exc, urllib3.exceptions.ProxyError):
        failure = exc.original_error
    # NewConnectionError (refused, no route, a name not resolved) is a ConnectTimeoutError.
    return not isinstance(failure, urllib3.exceptions.ConnectTimeoutError)


def _seconds_of_retry_after(value: str) -> float | None:
    """Retry-After is delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _int_or_none(value: str | int | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _positive_price(value: object) -> Decimal | None:
    """Twilio writes what a message cost as a negative amount ("-0.00790"); None: not yet."""
    if value in (None, ""):
        return None
    try:
        return abs(Decimal(str(value)))
    except InvalidOperation:
        return None
