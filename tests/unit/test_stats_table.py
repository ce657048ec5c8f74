"""`cgctl stats`' table: the NET I/O column as docker stats writes it."""

from __future__ import annotations

import pytest

from cgctl.accounting import Usage
from cgctl.cli.stats import _decimal, table


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0B"), (648, "648B"), (1234, "1.23kB"), (999_999, "1MB"), (5_000_000_000, "5GB")],
)
def test_decimal_units_with_three_digits(count: int, text: str) -> None:
    assert _decimal(count) == text


def row(name: str, rx: int | None, tx: int | None) -> Usage:
    return Usage(
        name, 0.0, 0, None, 0, 0, 0, 1, None, 0.0, None, None, None, net_rx_bytes=rx, net_tx_bytes=tx
    )


def test_net_io_is_received_over_sent_and_dash_without_a_network_of_its_own() -> None:
    lines = table([row("bridged", 1200, 648), row("on-host", None, None)]).splitlines()
    column = lines[0].index("NET I/O")
    assert lines[1][column:].startswith("1.2kB / 648B")
    assert lines[2][column:].startswith("- ")
