"""The training progress bar shows the limit that will end the run, as a bar on a terminal and as
plain lines in a log."""

from __future__ import annotations

import io

from edgemeta.meta.train import ProgressBar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_follows_the_iterations_when_no_time_budget_binds():
    out = Terminal()
    bar = ProgressBar(100, stream=out, every=1)
    bar(50, 0.5, 0.4)
    assert "50/100 it" in out.getvalue() and "val 0.4000" in out.getvalue()
    assert "#" * 15 + "." * 15 in out.getvalue()


def test_the_bar_follows_the_clock_when_the_time_budget_ends_the_run_first():
    out = Terminal()
    bar = ProgressBar(1_000_000, time_budget=1e-9, stream=out, every=1)
    bar(1, 1.0, None)
    bar(2, 0.9, None)
    last = out.getvalue().rsplit("\r", 1)[1]
    assert "/0s, 2 it" in last and "#" * 30 in last  # full: the budget is spent


def test_into_a_log_the_bar_writes_plain_lines_now_and_then_not_carriage_return_frames():
    out = io.StringIO()  # a file or a pipe: not a terminal
    bar = ProgressBar(1000, stream=out, every=1, log_every_s=3600)
    for it in range(1, 1001):
        bar(it, 0.5, None)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 2 and "1/1000 it" in lines[0] and "1000/1000 it" in lines[1]
