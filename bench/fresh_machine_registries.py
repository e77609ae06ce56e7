"""The package registries this host is set up with, read from its own configuration.

    python3 bench/fresh_machine_registries.py apt-mirror bookworm   # debootstrap's mirror
    python3 bench/fresh_machine_registries.py apt-sources bookworm  # the machine's sources.list
    python3 bench/fresh_machine_registries.py pip-conf              # its pip.conf [global] lines
    python3 bench/fresh_machine_registries.py hosts                 # its /etc/hosts lines
    python3 bench/fresh_machine_registries.py routes                # the tunnel's routes

For bench/fresh_machine.sh, so the fresh machine uses whatever mirrors this host uses and no
registry is named in the repository. apt: the `deb` entries of /etc/apt/sources.list and
/etc/apt/sources.list.d/*.list (one-line form) and *.sources (deb822 form) for the machine's
release (`bookworm`, `bookworm-updates`, `bookworm-security`, ...). pip: the index it is
configured with (`pip config list`, which covers PIP_INDEX_URL and every pip.conf), else
pip's own default index and the host its files are served from. Each registry host gets an
address 127.0.0.N inside the machine, which bench/fresh_machine_tunnel.py relays.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

APT = Path("/etc/apt")
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class AptSource:
    uri: str
    suite: str
    components: tuple[str, ...]


def apt_sources(release: str) -> list[AptSource]:
    """The host's enabled `deb` entries whose suite belongs to `release`."""
    found: list[AptSource] = []
    for path in [APT / "sources.list", *sorted((APT / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            found += _one_line_sources(path.read_text())
    for path in sorted((APT / "sources.list.d").glob("*.sources")):
        found += _deb822_sources(path.read_text())
    return [s for s in found if s.suite == release or s.suite.startswith(release + "-")]


def _one_line_sources(text: str) -> list[AptSource]:
    """`deb [options] uri suite component...` lines."""
    found = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # options: the keyrings of this host's apt
            while words and not words[0].endswith("]"):
                words.pop(0)
            words = words[1:]
        if len(words) >= 2:
            found.append(AptSource(words[0], words[1], tuple(words[2:])))
    return found


def _deb822_sources(text: str) -> list[AptSource]:
    """Paragraphs of `Types:`, `URIs:`, `Suites:`, `Components:` (and `Enabled:`)."""
    found = []
    for paragraph in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in paragraph.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
            continue
        components = tuple(fields.get("components", "").split())
        found += [AptSource(uri, suite, components) for uri in fields.get("uris", "").split()
                  for suite in fields.get("suites", "").split()]
    return found


def pip_indexes() -> tuple[str | None, list[str]]:
    """(index-url if configured, extra-index-urls), as this host's pip reads them."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                            check=True, capture_output=True, text=True).stdout
    values = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        values[key] = ast.literal_eval(value)
    index = next((values[k] for k in (":env:.index-url", "install.index-url", "global.index-url")
                  if k in values), None)
    extra = [url for key, urls in values.items() if key.endswith(".extra-index-url")
             for url in urls.split()]
    return index, extra


def pip_endpoints() -> list[tuple[str, int]]:
    index, extra = pip_indexes()
    urls = [index, *extra] if index else extra
    endpoints = [_endpoint(url) for url in urls]
    if index is None:  # pip's own default index, and where it serves its files from
        from pip._internal.models.index import PyPI
        endpoints += [_endpoint(PyPI.url), (PyPI.file_storage_domain, 443)]
    return [e for e in endpoints if e is not None]


def _endpoint(url: str) -> tuple[str, int] | None:
    """(host, port) of an http(s) URL; None for a local one (file://), which stays behind."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme]


def endpoints(release: str) -> list[tuple[str, int]]:
    found = [_endpoint(s.uri) for s in apt_sources(release)] + pip_endpoints()
    return list(dict.fromkeys(e for e in found if e is not None))


def local_addresses(release: str) -> dict[str, str]:
    """Registry host -> its address inside the machine, 127.0.0.2 onwards."""
    hosts = dict.fromkeys(host for host, _ in endpoints(release))
    return {host: f"127.0.0.{n}" for n, host in enumerate(hosts, start=2)}


def main(command: str, release: str = "bookworm") -> None:
    if command == "apt-mirror":
        [mirror] = [s.uri for s in apt_sources(release) if s.suite == release][:1] or [None]
        if mirror is None:
            sys.exit(f"no apt source of this host serves {release}")
        print(mirror)
    elif command == "apt-sources":
        for s in apt_sources(release):
            print(" ".join(["deb", s.uri, s.suite, *s.components]))
    elif command == "pip-conf":
        index, extra = pip_indexes()
        if index:
            print(f"index-url = {index}")
        remote = [url for url in extra if _endpoint(url)]
        if remote:
            print(f"extra-index-url = {' '.join(remote)}")
    elif command == "hosts":
        for host, address in local_addresses(release).items():
            print(f"{address} {host}")
    elif command == "routes":
        addresses = local_addresses(release)
        for host, port in endpoints(release):
            print(f"{addresses[host]}:{port}={host}:{port}")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(*sys.argv[1:])
