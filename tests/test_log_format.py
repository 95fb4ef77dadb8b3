"""Log lines carry CLOCK_MONOTONIC (`mono=` ns), the clock the guest agents and the host's servicing windows
use, so one servicing can be followed across every process's log (benchmarks/trace_blackout.py)."""
import logging
import re
import time

from vfkeep.log import KeyValueFormatter


def test_line_has_the_monotonic_clock_of_its_writing():
    record = logging.LogRecord("vfkeep.test", logging.INFO, __file__, 1, "hello", None, None)
    record.kv = {"k": "v w"}
    before = time.monotonic_ns()
    line = KeyValueFormatter().format(record)
    after = time.monotonic_ns()
    m = re.fullmatch(r'ts=\S+Z mono=(\d+) level=info pid=\d+ logger=vfkeep\.test msg=hello k="v w"', line)
    assert m, line
    assert before <= int(m.group(1)) <= after
