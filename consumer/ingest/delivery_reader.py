"""Reads the consumer's deliveries off a pika connection, at a fraction of pika's cost.

pika turns every frame into objects and routes it through its callback registry and the
blocking adapter's event queue: about two thirds of the consumer's Python time in
bench/ingest.py went there, for three frames per message (Basic.Deliver, the content
header, the body). This reader takes over the connection's input (the one hook pika has
for it, `Connection._on_data_available`) and handles exactly those frames of one consumer
itself: the delivery tag and the body are cut out of the bytes as they arrive, and the
properties are kept as bytes, decoded by pika only when asked for (a dead letter, a
message without an id).

Every other frame (heartbeats, acks of the confirm channel, Basic.Cancel, Channel.Close,
Connection.Blocked, ...) goes to pika as before, decoded by pika, in the order it came.
So pika still owns the connection: opening, heartbeats, flow control, acks, publishing,
closing and every error.

Deliveries are queued here, in arrival order, and taken by the caller after
`process_data_events` returns, as pika's blocking adapter does: no code of the caller runs
inside pika's I/O callbacks. `stop()` hands the consumer back to pika before a cancel, so
deliveries arriving between the cancel and its answer are rejected by pika as before.

It leans on pika internals (`_impl`, `_on_data_available`, `_process_frame`, `_frame_buffer`,
`bytes_received`, `_request_channel_dispatch`). `attach` checks they are there and
returns None otherwise, and the consumer then takes pika's ordinary path. What they do is
tested against RabbitMQ (tests/integration/test_delivery_reader.py), and pika is pinned to
the minor version those tests pass on.
"""

from __future__ import annotations

import logging
import struct
from collections import deque

import pika
import pika.exceptions
from pika import frame as pika_frame
from pika import spec
from pika.adapters.blocking_connection import BlockingChannel

log = logging.getLogger(__name__)

_FRAME_HEADER = struct.Struct(">BHL")  # type, channel, payload size
_FRAME_OVERHEAD = 8  # the header's 7 bytes and the frame-end octet
_METHOD_ID = struct.Struct(">I")
_DELIVERY_TAG = struct.Struct(">QB")  # delivery tag, then the `redelivered` bit
_CONTENT_HEADER = struct.Struct(">HHQ")  # class, weight, body size
_HEADER_FRAME = struct.Struct(">BHLHHQ")  # the frame header, then the content header's start
_DELIVER = spec.Basic.Deliver.INDEX


# (delivery tag, redelivered, properties as sent: the content header's flags and list, body);
# a plain tuple, as building a named one costs a Python call per message.
RawDelivery = tuple[int, bool, bytes, bytes]


class UndecodableProperties(ValueError):
    """Properties pika cannot decode; str() says why. RabbitMQ passes on whatever a producer
    sent: a header timestamp no datetime holds, a NaN double, an unknown field type, tables
    nested thousands deep, ..."""


def decode_properties(raw: bytes) -> pika.BasicProperties:
    properties = pika.BasicProperties()
    try:
        properties.decode(raw)
    except Exception as exc:  # noqa: BLE001 - pika raises what its struct and datetime calls do
        raise UndecodableProperties(f"{type(exc).__name__}: {str(exc)[:200]}") from None
    return properties


class _Content:
    """A delivery whose header and body frames are still arriving; `ours` or pika's."""

    __slots__ = ("ours", "tag", "redelivered", "properties", "missing", "parts")

    def __init__(self, ours: bool, tag: int, redelivered: bool) -> None:
        self.ours = ours
        self.tag = tag
        self.redelivered = redelivered
        self.properties: bytes | None = None  # None until the content header came
        self.missing = 0  # body bytes still to come
        self.parts: list[bytes] = []


class DeliveryReader:
    """The deliveries of one consumer (`consumer_tag` on `channel`), read from the bytes."""

    def __init__(self, connection: pika.BlockingConnection, channel: BlockingChannel,
                 consumer_tag: str) -> None:
        self._connection = connection
        self._impl = connection._impl
        self._channel_number = channel.channel_number
        self._consumer_tag = consumer_tag.encode()
        self._buffer = bytearray()
        self._active = True
        self._content: _Content | None = None
        self.deliveries: deque[RawDelivery] = deque()

    @classmethod
    def attach(cls, connection: pika.BlockingConnection, channel: BlockingChannel,
               consumer_tag: str) -> DeliveryReader | None:
        """Take over the connection's input; call before basic_consume(consumer_tag=...)."""
        impl = getattr(connection, "_impl", None)
        needed = ("_on_data_available", "_process_frame", "bytes_received", "_frame_buffer")
        if impl is None or not all(hasattr(impl, name) for name in needed) or not hasattr(
                connection, "_request_channel_dispatch"):
            log.warning("this pika has no hook for the delivery reader; using pika's own path",
                        extra={"action": "delivery_reader_unavailable",
                               "pika": pika.__version__})
            return None
        reader = cls(connection, channel, consumer_tag)
        reader._buffer += impl._frame_buffer  # whatever pika had read but not decoded yet
        impl._frame_buffer = b""
        impl._on_data_available = reader._on_data_available
        return reader

    def stop(self) -> None:
        """Deliveries from now on go to pika (which rejects them once the consumer is
        cancelled); one already being assembled is finished here."""
        self._active = False

    def take(self) -> list[RawDelivery]:
        deliveries = list(self.deliveries)
        self.deliveries.clear()
        return deliveries

    # -- pika calls this with each chunk read from the socket --------------------------------

    def _on_data_available(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        queued = len(self.deliveries)
        position = 0
        try:
            while len(buffer) - position >= _FRAME_OVERHEAD:
                frame_type, channel, size = _FRAME_HEADER.unpack_from(buffer, position)
                end = position + _FRAME_OVERHEAD + size
                if end > len(buffer):
                    break  # the rest of this frame is still on its way
                if buffer[end - 1] != spec.FRAME_END:
                    raise pika.exceptions.InvalidFrameError("Invalid FRAME_END marker")
                ours = channel == self._channel_number
                whole = ours and frame_type == spec.FRAME_METHOD and self._whole_delivery(
                    buffer, position, end)
                if whole:
                    end = whole
                elif not (ours and self._take_frame(frame_type, buffer, position + 7, size)):
                    _consumed, value = pika_frame.decode_frame(bytes(buffer[position:end]))
                    self._impl._process_frame(value)
                self._impl.bytes_received += end - position  # heartbeats count these
                position = end
        finally:
            del buffer[:position]
        if len(self.deliveries) > queued:
            # Ends the caller's process_data_events wait, as a delivery queued by pika does.
            self._connection._request_channel_dispatch(self._channel_number)

    def _whole_delivery(self, buffer: bytearray, start: int, method_end: int) -> int:
        """The common case, read in one go: a Basic.Deliver of ours with its header and a
        one-frame body all in the buffer. Returns where the next frame starts, or 0 when
        anything differs (the frames are then taken one by one)."""
        deliver = self._content is None and self._deliver_at(buffer, start + 7)
        if not deliver or not deliver[0]:
            return 0
        length = len(buffer)
        if method_end + 19 > length:
            return 0
        frame_type, channel, size, _class, _weight, body_size = _HEADER_FRAME.unpack_from(
            buffer, method_end)
        header_end = method_end + 8 + size
        if frame_type != spec.FRAME_HEADER or channel != self._channel_number or (
                header_end + 7 > length):
            return 0
        frame_type, channel, size = _FRAME_HEADER.unpack_from(buffer, header_end)
        body_end = header_end + 8 + size
        if (frame_type != spec.FRAME_BODY or channel != self._channel_number
                or size != body_size or body_end > length
                or buffer[header_end - 1] != spec.FRAME_END
                or buffer[body_end - 1] != spec.FRAME_END):
            return 0
        _ours, delivery_tag, redelivered = deliver
        self.deliveries.append((delivery_tag, redelivered,
                                bytes(buffer[method_end + 19:header_end - 1]),
                                bytes(buffer[header_end + 7:body_end - 1])))
        return body_end

    def _take_frame(self, frame_type: int, buffer: bytearray, payload: int, size: int) -> bool:
        """Follow the deliveries of our channel; True if this frame is ours to handle.

        A delivery for another consumer tag, or one arriving after stop(), is pika's: its
        header and body frames are followed too, only to hand them to pika as well."""
        if frame_type == spec.FRAME_METHOD:
            return self._take_deliver(buffer, payload)
        content = self._content
        if content is None:
            return False
        if frame_type == spec.FRAME_HEADER and content.properties is None:
            content.missing = _CONTENT_HEADER.unpack_from(buffer, payload)[2]
            content.properties = bytes(buffer[payload + 12:payload + size]) if content.ours else b""
        elif frame_type == spec.FRAME_BODY and content.properties is not None:
            content.missing -= size
            if content.ours:
                content.parts.append(bytes(buffer[payload:payload + size]))
        else:
            return False  # out of order: pika says what is wrong
        if content.missing <= 0:
            self._content = None
            if content.ours:
                self._deliver(content)
        return content.ours

    def _take_deliver(self, buffer: bytearray, payload: int) -> bool:
        deliver = self._deliver_at(buffer, payload)
        if deliver is None:
            return False
        self._content = _Content(*deliver)
        return self._content.ours

    def _deliver_at(self, buffer: bytearray, payload: int) -> tuple[bool, int, bool] | None:
        """(ours, delivery tag, redelivered) of a Basic.Deliver method; None for another
        method. Ours: for our consumer tag, and not stopped."""
        if _METHOD_ID.unpack_from(buffer, payload)[0] != _DELIVER:
            return None
        tag_length = buffer[payload + 4]
        tag_end = payload + 5 + tag_length
        ours = self._active and buffer[payload + 5:tag_end] == self._consumer_tag
        delivery_tag, bits = _DELIVERY_TAG.unpack_from(buffer, tag_end)
        # Exchange and routing key follow; smsq needs neither.
        return ours, delivery_tag, bool(bits & 1)

    def _deliver(self, content: _Content) -> None:
        parts = content.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        assert content.properties is not None  # its header came before its body
        self.deliveries.append((content.tag, content.redelivered, content.properties, body))
