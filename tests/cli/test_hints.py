"""The closing hint searches the user's own data."""

from __future__ import annotations

from cli.app import example_query


def test_the_query_is_drawn_from_the_first_non_empty_text():
    assert example_query(["", "   ", "Printer jams on page two after the firmware update"]) == (
        "Printer jams on page two after")
    assert example_query(["it's \"quoted\"; rm -rf /"]) == "it's \"quoted\"; rm -rf /"
    assert example_query([]) is None
