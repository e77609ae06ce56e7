"""`smsq status`: what is stored, by status and priority, and what waits in RabbitMQ."""

from __future__ import annotations

import argparse
import json

import psycopg

from consumer import amqp, pipeline
from consumer.commands.table import render_table
from consumer.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def collect(settings: Settings) -> dict:
    with psycopg.connect(settings.database_dsn) as conn:
        table = pipeline.counts_table(conn)
        oldest = pipeline.oldest_due_age_seconds(conn)
        senders = [{**bucket, "updated_datetime": bucket["updated_datetime"].isoformat()}
                   for bucket in pipeline.sender_buckets(conn)]
        dispatchers = [_json_times(d) for d in pipeline.dispatchers(conn)]
    return {"notifications": table, "oldest_due_age_seconds": oldest,
            "queues": amqp.queue_depths(settings), "senders": senders,
            "dispatchers": dispatchers}


def _json_times(row: dict) -> dict:
    return {key: value.isoformat() if hasattr(value, "isoformat") else value
            for key, value in row.items()}


def main(settings: Settings, args: argparse.Namespace) -> int:
    report = collect(settings)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(render(report))
    return 0


def render(report: dict) -> str:
    rows = []
    for status, by_priority in report["notifications"].items():
        counts = [by_priority[p] for p in pipeline.PRIORITIES]
        rows.append((status, *counts, sum(counts)))
    lines = [render_table(["status", *pipeline.PRIORITIES, "total"], rows)]
    age = report["oldest_due_age_seconds"]
    lines.append("")
    lines.append("oldest due message: " + ("none waiting" if age is None else f"{age:.1f} s old"))
    for queue, depth in report["queues"].items():
        lines.append(f"queue {queue}: " + ("not declared yet" if depth is None
                                            else f"{depth} message(s) ready"))
    lines.append("")
    lines.extend(render_senders(report["senders"]))
    lines.append("")
    lines.extend(render_dispatchers(report["dispatchers"]))
    return "\n".join(lines)


def render_dispatchers(dispatchers: list[dict]) -> list[str]:
    if not dispatchers:
        return ["dispatchers: none has run in the last hour"]
    rows = [(d["holder"], "alive" if d["alive"] else ("stopped" if d["stopped_datetime"]
                                                      else "dead"),
             d["senders_held"] if d["alive"] else 0, d["started_datetime"][:19])
            for d in dispatchers]
    return [render_table(["dispatcher", "state", "senders", "started"], rows)]


def render_senders(senders: list[dict]) -> list[str]:
    if not senders:
        return ["senders: no dispatcher has paced one yet"]
    rows = [(s["address"] or "(default)", round(s["tokens_now"], 2), s["rate"], s["capacity"],
             s["holder"], f"{s['age_seconds']:.0f} s ago", _pause_text(s)) for s in senders]
    lines = [render_table(["sender", "tokens", "rate/s", "burst", "paced by", "updated",
                           "paused"], rows)]
    lines.extend(f"paused {s['address'] or '(default)'}: {s['pause_message']}"
                 for s in senders if s["pause_reason"])
    return lines


def _pause_text(sender: dict) -> str:
    if not sender["pause_reason"]:
        return "-"
    wait = max(0.0, sender["paused_for_seconds"] or 0.0)
    return f"{sender['pause_reason']}, next try in {wait:.0f} s"

