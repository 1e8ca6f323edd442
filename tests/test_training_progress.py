"""The training progress bar shows the limit that will end the run."""

from __future__ import annotations

import io

from edgemeta.meta.train import ProgressBar


def test_the_bar_follows_the_iterations_when_no_time_budget_binds():
    out = io.StringIO()
    bar = ProgressBar(100, stream=out, every=1)
    bar(50, 0.5, 0.4)
    assert "50/100 it" in out.getvalue() and "val 0.4000" in out.getvalue()
    assert "#" * 15 + "." * 15 in out.getvalue()


def test_the_bar_follows_the_clock_when_the_time_budget_ends_the_run_first():
    out = io.StringIO()
    bar = ProgressBar(1_000_000, time_budget=1e-9, stream=out, every=1)
    bar(1, 1.0, None)
    bar(2, 0.9, None)
    last = out.getvalue().rsplit("\r", 1)[1]
    assert "/0s, 2 it" in last and "#" * 30 in last  # full: the budget is spent
