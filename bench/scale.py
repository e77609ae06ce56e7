"""Many senders, several dispatchers (issue 14, item 6), against a sandbox this script starts.

    .venv/bin/python bench/scale.py                 # every section, about 6 minutes
    .venv/bin/python bench/scale.py --only one --senders 10,100,300
    .venv/bin/python bench/scale.py --rounds 3      # rounds interleaved; median and worst
    .venv/bin/python bench/scale.py --case 300x1 --case 1000x3   # just these (senders x dispatchers)

Every sender sends 1 segment a second; the sandbox answers after 200 ms, as Twilio over the
internet might. Figures come from the sandbox's own arrival times (CLOCK_MONOTONIC, shared by
every process on the host) and from /proc (the dispatchers' CPU time).

Sections (targets from the issue):
  one       10, 100, 300 and 1,000 senders on one dispatcher: sends/s against the ideal (one
            a second a sender; target >= 294 at 300), and the dispatcher's CPU per send, which
            must stay flat as senders grow (the baseline is the 10-sender figure of the round)
  many      300 senders on 1, 2 and 3 dispatchers, and 1,000 on 3 (target >= 950/s)
  handover  300 senders on 3 dispatchers, one killed: the longest a sender of the dead one
            stood still, and the most segments any sender sent in one second (never above
            its bucket, 1)
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import scratch_database  # noqa: E402
from bench.dispatch import dispatcher, fake_twilio, insert_pending, reset  # noqa: E402
from tests.dispatch_support import most_in_any_window  # noqa: E402 - the tests' own measure

LATENCY_MS = 200
WARM_UP = 4.0  # seconds after the first send before measuring: every sender taken, bucket empty
SECTIONS = ("one", "many", "handover")


def senders_by_dispatchers(text: str) -> tuple[int, int]:
    """'300x1' -> (300, 1)."""
    try:
        senders, dispatchers = (int(n) for n in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected SENDERSxDISPATCHERS, e.g. 300x1") from None
    if senders < 1 or dispatchers < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: senders and dispatchers must be >= 1")
    return senders, dispatchers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=SECTIONS, action="append")
    parser.add_argument("--senders", default="10,100,300,1000",
                        help="sender counts of the 'one' section")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--case", action="append", metavar="SENDERSxDISPATCHERS",
                        type=senders_by_dispatchers,
                        help="run only these cases (e.g. 300x1), instead of the sections")
    args = parser.parse_args()
    counts = [int(n) for n in args.senders.split(",")]
    runs = {"one": [(n, 1) for n in counts],
            "many": [(300, 1), (300, 2), (300, 3), (1000, 3)], "handover": [(300, 3)],
            "case": args.case or []}
    results: dict[tuple, list[dict]] = {}
    # A name of its own: two benches running at once must not drop each other's database.
    with scratch_database(f"smsq_bench_scale_{os.getpid()}") as dsn:
        for _ in range(args.rounds):  # rounds interleaved: a noisy minute hits every case
            for section in (["case"] if args.case else args.only or SECTIONS):
                for senders, dispatchers in runs[section]:
                    reset(dsn)
                    outcome = run(dsn, senders, dispatchers, args.seconds,
                                  kill_one=section == "handover")
                    results.setdefault((section, senders, dispatchers), []).append(outcome)
    report(results)
    return 0


def run(dsn: str, senders: int, dispatchers: int, seconds: float, kill_one: bool) -> dict:
    numbers = [f"+1202555{1000 + i}" for i in range(senders)]
    insert_pending(dsn, senders * int(WARM_UP + seconds + 8), senders=numbers)
    # Requests in flight: senders x rate x latency, spread over the dispatchers, with room.
    concurrency = str(max(64, int(senders * LATENCY_MS / 1000 / dispatchers * 2)))
    values = {"SMSQ_SENDERS": ",".join(numbers), "TWILIO_SMS_RATE": "1", "SMSQ_BURST": "1",
              "SMSQ_DISPATCH_CONCURRENCY": concurrency}
    with fake_twilio(latency_ms=LATENCY_MS) as fake, ExitStack() as stack:
        processes = [stack.enter_context(dispatcher(dsn, fake, **values))
                     for _ in range(dispatchers)]
        first = wait_first(fake)
        start = first + WARM_UP
        time.sleep(max(0.0, start - time.monotonic()))
        cpu_before = [cpu_seconds(p.pid) for p in processes]
        sandbox = sandbox_pid()
        sandbox_before = cpu_seconds(sandbox)
        killed_at = None
        if kill_one:
            time.sleep(seconds / 3)
            processes[0].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
        time.sleep(max(0.0, start + seconds - time.monotonic()))
        cpu = sum(cpu_seconds(p.pid) - before for p, before in zip(processes[kill_one:],
                                                                  cpu_before[kill_one:]))
        sandbox_cpu = cpu_seconds(sandbox) - sandbox_before
        received = fake.messages(accepted_only=True)
    window = [m for m in received if start <= m["received_monotonic"] < start + seconds]
    by_sender: dict[str, list[float]] = {}
    for message in received:
        by_sender.setdefault(message["from"], []).append(message["received_monotonic"])
    worst_second = max(most_in_any_window(sorted(times), window=1.0 * 0.999)
                       for times in by_sender.values())
    closest = min((b - a for times in by_sender.values()
                   for a, b in zip(sorted(times), sorted(times)[1:])), default=float("inf"))
    outcome = {"rate": len(window) / seconds, "ideal": senders, "closest": closest,
               "cpu_us_per_send": cpu / max(1, len(window)) * 1e6, "worst_second": worst_second,
               "sandbox_cores": sandbox_cpu / seconds}
    if killed_at is not None:
        outcome["standstill"] = max(longest_gap(times, killed_at) for times in by_sender.values())
    return outcome


def longest_gap(times: list[float], around: float) -> float:
    """The longest pause of one sender spanning `around` (the kill)."""
    times = sorted(times)
    gaps = [b - a for a, b in zip(times, times[1:]) if a <= around + 1 and b >= around]
    return max(gaps, default=0.0)


def wait_first(fake) -> float:
    deadline = time.monotonic() + 60
    while not (received := fake.messages(accepted_only=True)):
        if time.monotonic() > deadline:
            raise SystemExit("no send within 60 s")
        time.sleep(0.05)
    return received[0]["received_monotonic"]


def sandbox_pid() -> int:
    """The `smsq fake-twilio` this script started: its CPU is taken from the same 2 cores."""
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and b"fake-twilio" in (proc / "cmdline").read_bytes()
                    and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid()):
                return int(proc.name)
        except OSError:  # a process that ended while we looked
            continue
    raise SystemExit("the sandbox process is gone")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (USER_HZ)


def report(results: dict[tuple, list[dict]]) -> None:
    baseline = results.get(("one", 10, 1))
    for (section, senders, dispatchers), outcomes in results.items():
        rates = sorted(o["rate"] for o in outcomes)
        cpu = sorted(o["cpu_us_per_send"] for o in outcomes)
        line = (f"{section:8} {senders:5} senders, {dispatchers} dispatcher(s): "
                f"{statistics.median(rates):7.1f} sends/s (worst {rates[0]:.1f}; ideal "
                f"{senders}, {statistics.median(rates) / senders:.3f} of it), "
                f"CPU {statistics.median(cpu):.0f} us/send (worst {cpu[-1]:.0f})")
        if baseline and section == "one":
            base = statistics.median(o["cpu_us_per_send"] for o in baseline)
            line += f", {statistics.median(cpu) / base:.2f}x the 10-sender CPU"
        line += f", most segments of one sender in 1 s: {max(o['worst_second'] for o in outcomes):g}"
        line += f" (closest two arrivals {min(o['closest'] for o in outcomes):.3f} s apart)"
        line += f", the sandbox used {statistics.median(o['sandbox_cores'] for o in outcomes):.2f} cores"
        if section == "handover":
            stand = sorted(o["standstill"] for o in outcomes)
            line += f", longest standstill of a sender at the kill {statistics.median(stand):.2f} s"
            line += f" (worst {stand[-1]:.2f})"
        print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
