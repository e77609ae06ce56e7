"""The pure parts of issue 18: delivery-health rules, countries of numbers, the spend chart."""

from __future__ import annotations

from datetime import date

from consumer.money import country_of
from consumer.serve import charts
from consumer.serve.delivery_health import Tally, findings


def reasons(tallied) -> set[tuple[str, str, str]]:
    return {(f.scope, f.key, f.reason) for f in findings(tallied, 0.1)}


def test_the_failure_share_alerts_above_the_rate_over_twenty_finished_messages():
    assert reasons({("sender", ""): Tally(sent=30, finished=20, delivered=18)}) == set()
    assert reasons({("sender", ""): Tally(sent=30, finished=20, delivered=17)}) == {
        ("sender", "", "failure_rate")}
    assert reasons({("sender", ""): Tally(sent=19, finished=19, delivered=0)}) == set()


def test_slow_receipts_alert_above_a_tenth_and_any_30007_alerts():
    assert reasons({("country", "GB"): Tally(sent=20, slow=3)}) == {
        ("country", "GB", "slow_receipts")}
    assert reasons({("country", "GB"): Tally(sent=20, slow=2)}) == set()
    assert reasons({("sender", "+15005550006"): Tally(sent=1, finished=1, filtered=1)}) == {
        ("sender", "+15005550006", "carrier_filtering")}


def test_the_country_of_a_number():
    assert country_of("+14155550123") == "US"
    assert country_of("+447400123456") == "GB"
    assert country_of("+4915123456789") == "DE"
    assert country_of("not a number") == ""


def test_the_spend_chart_has_a_bar_a_day_and_a_money_scale():
    series = charts.per_day([(date(2026, 11, 30), 0.034)], date(2026, 12, 2), days=30)
    assert len(series) == 30 and series[-3] == (date(2026, 11, 30), 0.034)
    chart = charts.spend_chart(series)
    assert [t.label for t in chart.ticks] == ["0", "0.025", "0.05"]
    assert chart.total == 0.034 and chart.bars[-3].height > 0 == chart.bars[-1].height
