"""studio.units: sizes as users type them, sizes as they read them."""

from __future__ import annotations

import pytest

from studio.units import GiB, MiB, TiB, fmt_bytes, parse_size, ram_info


@pytest.mark.parametrize("text, expected", [
    ("4GiB", 4 * GiB), ("512MiB", 512 * MiB), ("6G", 6 * GiB), ("1.5GB", 1_500_000_000), ("123", 123),
    (" 2 gib ", 2 * GiB), ("10kb", 10_000), ("3k", 3072),
])
def test_parse_size_reads_binary_and_decimal_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "four GiB", "4 parsecs"])
def test_parse_size_refuses_what_it_cannot_read_and_says_how_to_write_it(text):
    with pytest.raises(ValueError, match="write it like 4GiB"):
        parse_size(text)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (300 * MiB, "300.0 MiB"), (int(4.8 * GiB), "4.8 GiB"),
    (2 * TiB, "2.0 TiB"), (-3 * GiB, "-3.0 GiB"),
])
def test_fmt_bytes_picks_the_largest_binary_unit(n, text):
    assert fmt_bytes(n) == text


def test_ram_info_reports_total_at_least_available():
    total, available = ram_info()
    assert total > 0 and 0 <= available <= total
