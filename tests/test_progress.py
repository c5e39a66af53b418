"""relabel_dali.progress: tqdm on a terminal, timed plain lines elsewhere, interval from the environment."""
import io

import pytest
from tqdm import tqdm

from relabel_dali import progress as prog


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


class TestPlainLines:
    def make(self, total, interval_s=30.0, iterable=None):
        clock, out = FakeClock(), io.StringIO()
        bar = prog.PlainProgress(iterable, total=total, desc="pack_labels", unit="rec", interval_s=interval_s,
                                 file=out, clock=clock)
        return bar, clock, out

    def test_line_every_interval_with_rate_and_eta(self):
        bar, clock, out = self.make(5000)
        clock.now += 8.0
        bar.update(1200)  # 8 s < 30 s: nothing yet
        assert out.getvalue() == ""
        clock.now += 22.0
        bar.update(3300)  # 4500 records in 30 s: 150 rec/s, 500 left: eta 3.3 s
        rate = 4500 / 30.0
        assert out.getvalue() == f"pack_labels: 4500/5000 (90%) {rate:,.0f} rec/s, eta {500 / rate:.0f} s\n"
        clock.now += 10.0
        bar.update(100)  # 10 s after the last line: still quiet
        assert out.getvalue().count("\n") == 1

    def test_summary_line_once(self):
        bar, clock, out = self.make(40)
        clock.now += 4.0
        bar.update(40)
        bar.close()
        bar.close()
        assert out.getvalue() == "pack_labels: 40 rec in 4 s (10.0 rec/s)\n"

    def test_summary_says_when_short_of_total(self):
        bar, clock, out = self.make(40)
        clock.now += 2.0
        bar.update(10)
        bar.close()
        assert out.getvalue() == "pack_labels: 10 of 40 rec in 2 s (5.0 rec/s)\n"

    def test_iterating_yields_everything_and_counts(self):
        bar, clock, out = self.make(None, interval_s=0.0, iterable=iter(range(3)))
        assert list(bar) == [0, 1, 2]
        lines = out.getvalue().splitlines()
        assert [line.split(" ")[1] for line in lines[:3]] == ["1", "2", "3"]
        assert lines[-1].startswith("pack_labels: 3 rec in")

    def test_postfix_appended(self):
        bar, clock, out = self.make(10, interval_s=0.0)
        bar.set_postfix(loss="0.5000", lr="0.1", refresh=False)
        clock.now += 1.0
        bar.update(5)
        assert out.getvalue() == "pack_labels: 5/10 (50%) 5 rec/s, eta 1 s, loss=0.5000, lr=0.1\n"

    def test_long_eta_in_minutes(self):
        bar, clock, out = self.make(100_000, interval_s=1.0)
        clock.now += 10.0
        bar.update(1000)  # 100 rec/s, 99,000 left: 990 s
        assert out.getvalue().endswith("eta 16 min 30 s\n")


class TestChoice:
    def test_terminal_gets_tqdm(self):
        bar = prog.progress(10, desc="x", file=Terminal())
        assert isinstance(bar, tqdm)
        bar.close()

    def test_tqdm_options_reach_the_bar(self):
        bar = prog.progress(10, desc="x", file=Terminal(), leave=False)
        assert bar.leave is False
        bar.close()
        assert isinstance(prog.progress(10, desc="x", file=io.StringIO(), leave=False), prog.PlainProgress)

    def test_pipe_gets_plain_lines_with_len_as_total(self):
        bar = prog.progress([1, 2, 3], desc="x", file=io.StringIO())
        assert isinstance(bar, prog.PlainProgress) and bar.total == 3

    def test_disabled_prints_nothing(self):
        out = io.StringIO()
        assert list(prog.progress([1, 2], desc="x", file=out, disable=True, interval_s=0)) == [1, 2]
        assert out.getvalue() == ""

    @pytest.mark.parametrize("value, expected", [("5", 5.0), ("0", 0.0), ("", 30.0)])
    def test_interval_from_environment(self, monkeypatch, value, expected):
        monkeypatch.setenv(prog.INTERVAL_ENV, value)
        assert prog.interval_from_env() == expected
        assert prog.progress(1, desc="x", file=io.StringIO()).interval_s == expected

    @pytest.mark.parametrize("value", ["soon", "-1", "nan"])
    def test_bad_interval_named(self, monkeypatch, value):
        monkeypatch.setenv(prog.INTERVAL_ENV, value)
        with pytest.raises(ValueError, match=f"{prog.INTERVAL_ENV}="):
            prog.interval_from_env()
