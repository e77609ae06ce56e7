"""The pure parts of `smsq serve`: delivery status order, the chart, formatting, redirects."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from consumer.serve import auth, charts, delivery, render

ORDER = ["queued", "sent", "delivered"]


@pytest.mark.parametrize("twilio, ours", [
    ("accepted", "queued"), ("queued", "queued"), ("sending", "queued"), ("sent", "sent"),
    ("delivered", "delivered"), ("read", "delivered"), ("undelivered", "undelivered"),
    ("failed", "failed"), ("FAILED", "failed"), ("receiving", None), ("canceled", None),
])
def test_twilio_statuses_map_to_the_five_delivery_statuses(twilio, ours):
    assert delivery.delivery_status_of(twilio) == ours


def test_delivery_status_moves_forward_only():
    assert delivery.moves_forward(None, "sent")
    for i, current in enumerate(ORDER):
        for j, incoming in enumerate(ORDER):
            assert delivery.moves_forward(current, incoming) is (j > i), (current, incoming)
    for final in delivery.FINAL:
        for incoming in ["queued", "sent", *delivery.FINAL]:
            assert not delivery.moves_forward(final, incoming)


@pytest.mark.parametrize("raw, code", [("30003", 30003), (" 30005 ", 30005), ("", None),
                                       (None, None), ("abc", None), ("-1", None)])
def test_error_codes_are_numbers_or_nothing(raw, code):
    assert delivery.error_code_of(raw) == code


def test_per_minute_fills_the_hour_with_zeros():
    end = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)
    series = charts.per_minute([(end - timedelta(minutes=2), 7), (end, 3)], end)
    assert len(series) == 60
    assert series[0][0] == end - timedelta(minutes=59)
    assert series[-3:] == [(end - timedelta(minutes=2), 7), (end - timedelta(minutes=1), 0),
                           (end, 3)]


def test_bars_scale_to_a_round_axis_maximum():
    end = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)
    chart = charts.bar_chart(charts.per_minute([(end, 37)], end))
    assert chart.peak == 37 and chart.total == 37
    assert [tick.label for tick in chart.ticks] == ["0", "25", "50"]
    tallest = max(chart.bars, key=lambda bar: bar.height)
    assert tallest.minute == end
    assert tallest.y + tallest.height == pytest.approx(chart.baseline)
    assert all(bar.height == 0 for bar in chart.bars if bar is not tallest)


@pytest.mark.parametrize("value, ceiling", [(0, 1), (1, 1), (3, 5), (10, 10), (11, 20),
                                            (230, 500), (1001, 2000)])
def test_nice_ceiling(value, ceiling):
    assert charts.nice_ceiling(value) == ceiling


@pytest.mark.parametrize("seconds, text", [(None, "—"), (0, "0 s"), (59, "59 s"),
                                           (97, "1 min 37 s"), (900, "15 min"),
                                           (3 * 3600 + 20 * 60, "3 h 20 min"),
                                           (3 * 86400 + 4 * 3600, "3 d 4 h")])
def test_durations_read_like_a_person_would_say_them(seconds, text):
    assert render.duration(seconds) == text


@pytest.mark.parametrize("target, safe", [("/errors?code=1", "/errors?code=1"), (None, "/"),
                                          ("//evil.example", "/"), ("/\\evil.example", "/"),
                                          ("https://evil.example/", "/"), ("errors", "/")])
def test_redirects_after_login_stay_on_the_site(target, safe):
    assert auth.safe_next(target) == safe
