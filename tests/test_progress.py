"""Progress off a terminal: a few whole lines, not a bar redrawn into thousands."""

from __future__ import annotations

import io

import pytest
from tqdm import tqdm

from dda_ray import progress
from dda_ray.config import ConfigError, load_config


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    return c


def lines_of(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_a_long_stage_says_at_most_one_line_per_tenth_and_per_30_s(clock):
    out = io.StringIO()
    bar = progress.LineProgress(total=1000, desc="distill epoch 1/3", unit="step", file=out)
    for _ in range(1000):  # 20 minutes of steps, 1.2 s each
        clock.t += 1.2
        bar.update(1)
    bar.close()
    lines = lines_of(out)
    assert 5 <= len(lines) <= 11, lines  # at most one per tenth, plus the last
    assert lines[-1].startswith("distill epoch 1/3: 100% (1000/1000 step) done in 20m00s")
    assert all("\r" not in line for line in lines)
    # quick steps (0.1 s): a line every 30 s at most, however many tenths pass
    out = io.StringIO()
    bar = progress.LineProgress(total=100, desc="quick", file=out)
    for _ in range(100):
        clock.t += 0.1
        bar.update(1)
    bar.close()
    assert lines_of(out) == ["quick: 100% (100/100 it) done in 10s, 10.00 it/s"]


def test_short_inner_stages_leave_no_line_and_long_ones_one(clock):
    out = io.StringIO()
    for _ in progress.LineProgress(range(10), desc="synthesis round 4", leave=False, file=out):
        clock.t += 1.0  # 10 s: the epoch line says enough
    assert lines_of(out) == []
    for _ in progress.LineProgress(range(10), desc="synthesis round 5", leave=False, file=out):
        clock.t += 4.0
    lines = lines_of(out)  # 40 s: one line at 32 s (8/10), then the last
    assert [line.split(":")[0] for line in lines] == ["synthesis round 5"] * 2 and "done in 40s" in lines[-1], lines


def test_a_stage_without_a_total_and_postfix(clock):
    out = io.StringIO()
    bar = progress.LineProgress(desc="reading", unit="img", file=out)
    for _ in range(3):
        clock.t += 31
        bar.update(100)
    bar.set_postfix(loss="0.123")
    with bar:
        pass
    lines = lines_of(out)
    assert lines[0] == "reading: (100 img) after 31s, 3.23 img/s"
    assert lines[-1].startswith("reading: (300 img) done in 1m33s") and lines[-1].endswith("loss=0.123")
    assert len(lines) == 4


def test_mode_follows_the_terminal_unless_set(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())
    assert progress.resolve("auto") == "lines"
    monkeypatch.setattr(progress.sys, "stderr", Tty())
    assert progress.resolve("auto") == "bars"
    assert progress.resolve("lines") == "lines"
    try:
        assert progress.set_mode("lines") == "lines"
        assert isinstance(progress.bar(range(3), desc="x"), progress.LineProgress)
        assert progress.set_mode("bars") == "bars"
        assert isinstance(progress.bar(range(3), desc="x"), tqdm)
    finally:
        progress.set_mode("auto")
    with pytest.raises(ConfigError, match="run.progress"):
        load_config(None, ["run.progress=sometimes"])
