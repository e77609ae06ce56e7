"""How fast `smsq fake-twilio` answers, so the dispatcher's benchmarks measure smsq, not the fake.

    .venv/bin/python bench/fake_twilio.py [--seconds 3]

Prints, for the official twilio client (what the dispatcher uses) from several threads:
- zero latency: creates/s against the fake (best of 3 alternating rounds), and against a baseline measured in the same run (a
  bare keep-alive HTTP server answering the same 201 body every time: the client's
  and HTTP's cost alone), as a ratio;
- 100 concurrent clients with 200 ms fake latency: creates/s against the ideal 100 / 0.2 s.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from requests.adapters import HTTPAdapter
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import calls_per_second  # noqa: E402
from consumer.sandbox import FAKE_ACCOUNT_SID, FAKE_AUTH_TOKEN, spawn  # noqa: E402

TWILIO_API_URL = "https://api.twilio.com"
ROUNDS = 3

# A constant answer, the same bytes as the fake's answer, so the client does the same work.
BASELINE_SERVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
BODY = json.dumps(json.loads(sys.argv[1])).encode()
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.wfile.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
"""


class BaseUrlHttpClient(TwilioHttpClient):
    def __init__(self, base_url: str, pool_size: int) -> None:
        super().__init__(pool_connections=True)
        self.timeout = (3, 10)
        self.base_url = base_url
        self.session.mount("http://", HTTPAdapter(pool_maxsize=pool_size, max_retries=0))

    def request(self, method, url, *args, **kwargs):
        return super().request(method, url.replace(TWILIO_API_URL, self.base_url, 1),
                               *args, **kwargs)


def creates_per_second(url: str, threads: int, seconds: float) -> float:
    """Creates per second from `threads` threads sharing one client, as a dispatcher would."""
    client = Client(FAKE_ACCOUNT_SID, FAKE_AUTH_TOKEN,
                    http_client=BaseUrlHttpClient(url, pool_size=threads))
    return calls_per_second(
        lambda: client.messages.create(to="+14155550123", from_="+15005550006", body="bench"),
        threads, seconds)


def one_answer(url: str) -> str:
    """The fake's JSON answer to one create (the baseline repeats it)."""
    client = Client(FAKE_ACCOUNT_SID, FAKE_AUTH_TOKEN, http_client=BaseUrlHttpClient(url, 1))
    client.messages.create(to="+14155550123", from_="+15005550006", body="bench")
    return client.http_client._test_only_last_response.text


def start_baseline(answer: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-c", BASELINE_SERVER, answer],
                               stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    seconds = parser.parse_args().seconds

    fake, control = spawn("--send-delay-ms", "0", "--deliver-delay-ms", "0")
    baseline, baseline_url = start_baseline(one_answer(control.url))
    try:
        for threads in (1, 4, 16):
            # Alternating rounds, best of each: the machine is shared, and noise only slows.
            rounds = [(creates_per_second(baseline_url, threads, seconds / ROUNDS),
                       creates_per_second(control.url, threads, seconds / ROUNDS))
                      for _ in range(ROUNDS)]
            base, ours = (max(r[0] for r in rounds), max(r[1] for r in rounds))
            print(f"zero latency, {threads:>2} client threads: fake {ours:7.0f} creates/s, "
                  f"constant-answer baseline {base:7.0f}/s, ratio {ours / base:.2f}")
        control.clear()
        control.set_latency(200)
        rate = creates_per_second(control.url, 100, max(seconds, 3.0))
        ideal = 100 / 0.2
        print(f"200 ms latency, 100 concurrent clients: {rate:.0f} creates/s "
              f"(ideal {ideal:.0f}/s, ratio {rate / ideal:.2f})")
    finally:
        for process in (fake, baseline):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)


if __name__ == "__main__":
    main()
