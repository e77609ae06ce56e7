"""The fresh machine's only way out: package registries, nothing else.

    python3 bench/fresh_machine_tunnel.py /run/netns/NAME 127.0.0.2:80=MIRROR-HOST:80 ...

Listens on each local address INSIDE the network namespace (its /etc/hosts maps the registry
names there) and relays the bytes to the real host from the host's own network. The routes
come from bench/fresh_machine_registries.py, out of this host's own apt and pip settings. TLS passes
through untouched, so pip checks PyPI's certificate as it would anywhere. Used by
bench/fresh_machine.sh only; the namespace's own 127.0.0.1 stays its own.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import sys

CLONE_NEWNET = 0x40000000


def _enter(namespace_fd: int) -> None:
    """Move this thread into the network namespace behind `namespace_fd`."""
    if ctypes.CDLL(None, use_errno=True).setns(namespace_fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def _listeners(netns: str, addresses: list[tuple[str, int]]) -> list[socket.socket]:
    """Sockets bound inside `netns`; a socket keeps the namespace it was made in."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    inside = os.open(netns, os.O_RDONLY)
    _enter(inside)
    try:
        return [socket.create_server(address) for address in addresses]
    finally:
        _enter(home)  # outgoing connections leave from the host's network
        os.close(inside)
        os.close(home)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def _relay_to(target: tuple[str, int]):
    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError as exc:
            print(f"tunnel: cannot reach {target[0]}:{target[1]}: {exc}", file=sys.stderr)
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    return relay


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main(netns: str, routes: list[str]) -> None:
    pairs = [tuple(_address(side) for side in route.split("=", 1)) for route in routes]
    sockets = _listeners(netns, [local for local, _ in pairs])
    servers = [await asyncio.start_server(_relay_to(target), sock=sock)
               for sock, (_, target) in zip(sockets, pairs)]
    print("tunnel: ready", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
