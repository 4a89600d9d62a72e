"""control/tables.py: the CLI's tables, colours, units and monitor frames, without a daemon."""
from __future__ import annotations

import io
import os
import pty

from pmdaemon.control.tables import Column, MonitorView, format_bytes, format_duration, render_table, use_colour


def test_table_alignment_ignores_colour_codes():
    columns = [Column("name", "name"), Column("status", "status", state=True), Column("port", "port", align="right")]
    rows = [{"name": "web-0", "status": "online", "port": 3000}, {"name": "web-10", "status": "waiting restart"}]
    plain = render_table(columns, rows, colour=False).splitlines()
    coloured = render_table(columns, rows, colour=True).splitlines()
    assert plain == ["name    status           port", "web-0   online           3000", "web-10  waiting restart     -"]
    assert coloured[1] == "web-0   \x1b[32monline\x1b[0m           3000"
    assert coloured[0] == plain[0]  # titles are never coloured
    assert render_table(columns, [], empty="no instances") == "no instances"


def test_use_colour_needs_a_terminal_and_no_no_color():
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=False) as terminal:
            assert use_colour(terminal, {})
            assert not use_colour(terminal, {"NO_COLOR": "1"})
        assert not use_colour(io.StringIO(), {})
    finally:
        os.close(master)
        os.close(slave)


def test_human_units():
    assert format_duration(42) == "42s" and format_duration(3725) == "1h 2m" and format_duration(0.4) == "0s"
    assert format_duration(90061) == "1d 1h"
    assert format_bytes(512) == "512 B" and format_bytes(1536) == "1.5 KiB" and format_bytes(3 * 1024 ** 3) == "3.0 GiB"


def test_monitor_rate_is_the_request_delta_between_frames():
    view = MonitorView(interval=1)
    first = {"time": 100.0, "stats": {"requests": 10}, "status": [{"name": "http:8080", "requests_per_second": 4.0}],
             "backends": [{"address": "127.0.0.1:3000", "state": "up", "active": 1}],
             "traffic": [{"address": "127.0.0.1:3000", "share_last_minute": 100.0, "share_total": 100.0}]}
    assert "requests/s  4.0" in view.render(first, colour=False)
    second = dict(first, time=102.0, stats={"requests": 50})
    text = view.render(second, colour=False)
    assert "requests/s  20.0" in text and "100.0%" in text
    missing = {"time": 103.0, "stats": None, "status": None, "backends": None, "traffic": None,
               "unavailable": {"status": "no load balancer is running", "backends": "no load balancer is running"}}
    assert view.render(missing, colour=False).count("no load balancer is running") == 2
