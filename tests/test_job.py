"""launch/job.py's Progress: what rank 0 shows of the denoising, on a terminal (bars) and elsewhere (plain lines).

Step lines are checked by count, never by time: the 10% rule alone (the time rule turned off with an infinite
interval), and the time rule alone (an interval of 0 s, which every step exceeds).
"""

import io
import logging
import re
import sys
from types import SimpleNamespace

import pytest

from k5.launch.job import Progress, adapter_lines, format_duration
from k5.launch.logs import LOGGER, Logs

log = logging.getLogger(LOGGER)


def item(index: int, steps: int):
    return SimpleNamespace(index=index, request=SimpleNamespace(steps=steps))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def rank0(monkeypatch):
    """``rank0(tty=False)`` in the test body makes sys.stderr a string buffer (one that says it is a terminal with
    ``tty``), with rank 0's terminal log on it as generate.main sets it up, and returns the buffer. (In the body:
    pytest sets sys.stderr again between a fixture's setup and the test.)"""
    opened = []

    def start(tty: bool = False) -> io.StringIO:
        err = Terminal() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        opened.append(Logs(0, None))
        return err

    yield start
    for logs in opened:
        logs.close()


def step_lines(text: str, index: int) -> list[tuple[int, int, int]]:
    return [tuple(map(int, m)) for m in re.findall(rf"^item {index}: step (\d+)/(\d+) \((\d+)%\)", text, re.M)]


@pytest.mark.parametrize("steps, want", [
    (50, [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]),
    (20, [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]),
    (12, [2, 3, 4, 5, 6, 8, 9, 10, 11, 12]),  # 12 steps: the tenths end after steps 1.2, 2.4, 3.6, ... (7 has none)
    (4, [1, 2, 3, 4]),  # fewer than 10 steps: every step crosses a tenth
])
def test_without_a_terminal_a_line_every_tenth_of_the_steps(rank0, steps, want):
    stderr = rank0()
    p = Progress(1, enabled=True, terminal=False, every_s=float("inf"))
    for i in range(steps):
        p.step(item(3, steps), i)
    p.close()
    text = stderr.getvalue()
    assert step_lines(text, 3) == [(d, steps, 100 * d // steps) for d in want], text
    assert "\r" not in text and "denoising" not in text  # no bar drawn into a log file
    lines = text.splitlines()
    # the rate needs two step ends; the ETA is left out once nothing remains
    assert all(("s/step" in line) == (n > 1) for line, n in zip(lines, want)), text
    assert all(("ETA" in line) == (1 < n < steps) for line, n in zip(lines, want)), text
    rate_and_eta = r"[\d.e+-]+ s/step, ETA \d+(s|m\d\ds|h\d\dm)"
    assert re.fullmatch(rf"item 3: step {want[1]}/{steps} \(\d+%\), {rate_and_eta}", lines[1]), lines[1]


def test_without_a_terminal_the_interval_adds_lines_between_tenths(rank0):
    stderr = rank0()
    p = Progress(1, enabled=True, terminal=False, every_s=0.0)  # every step is past the interval
    for i in range(50):
        p.step(item(0, 50), i)
    assert [d for d, _, _ in step_lines(stderr.getvalue(), 0)] == list(range(1, 51))


def test_only_rank_0_reports(rank0):
    stderr = rank0()
    p = Progress(1, enabled=False, terminal=False, every_s=0.0)
    for i in range(4):
        p.step(item(0, 4), i)
    p.close()
    assert stderr.getvalue() == ""


def test_on_a_terminal_a_bar_only_while_an_item_denoises(rank0):
    """No empty bar before the first step (loading and text encoding come first), and a finished item's bar is
    cleared, so the log lines after it do not draw it again."""
    stderr = rank0(tty=True)
    p = Progress(1, enabled=True)  # finds the terminal itself
    assert "denoising" not in stderr.getvalue()
    for i in range(3):
        p.step(item(0, 3), i)
    log.info("item 0 done")
    log.info("summary")
    p.close()
    before, after = stderr.getvalue().split("item 0 done")
    # (tqdm redraws at most every 0.1 s, so a fast test sees the bar's first state: its total, never an empty 0/1)
    assert "| 0/3 [" in before and "/1 [" not in before, repr(before)
    assert "denoising" not in after, repr(after)
    assert not step_lines(before, 0)  # bars, not lines, on a terminal


def test_on_a_terminal_each_item_gets_its_own_bar(rank0):
    stderr = rank0(tty=True)
    p = Progress(2, enabled=True)
    for index, steps in ((0, 2), (1, 3)):
        for i in range(steps):
            p.step(item(index, steps), i)
        log.info("item %d done", index)
    p.close()
    first, second, after = re.split(r"item \d done", stderr.getvalue())
    assert "denoising:   0%|          | 0/2 [" in first and "/3 [" not in first, repr(first)
    assert "denoising:   0%|          | 0/3 [" in second and "/2 [" not in second.replace("0/2 [00:00<?, ?item", ""), \
        repr(second)
    assert "denoising" not in after, repr(after)


def test_adapter_lines_name_path_scale_and_layers(tmp_path):
    a = SimpleNamespace(path=tmp_path / "style.safetensors", scale=0.75, targets={f"w{i}": None for i in range(26)})
    b = SimpleNamespace(path=tmp_path / "zoom.safetensors", scale=1.0, targets={"w": None})
    assert adapter_lines((a, b)) == [
        f"LoRA merged into the DiT: {tmp_path}/style.safetensors at scale 0.75 (26 layers)",
        f"LoRA merged into the DiT: {tmp_path}/zoom.safetensors at scale 1 (1 layer)"]
    assert adapter_lines(()) == []


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 59.4, 60, 132, 3599, 3600, 7322)] == [
        "0s", "59s", "1m00s", "2m12s", "59m59s", "1h00m", "2h02m"]
