"""Log lines carry CLOCK_MONOTONIC (`mono=` ns), the clock the guest agents and the host's servicing windows
use, so one servicing can be followed across every process's log (benchmarks/trace_blackout.py)."""
import logging
import re
import time

from vfkeep.log import KeyValueFormatter

from helpers import process_log


def test_line_has_the_monotonic_clock_of_its_writing():
    record = logging.LogRecord("vfkeep.test", logging.INFO, __file__, 1, "hello", None, None)
    record.kv = {"k": "v w"}
    before = time.monotonic_ns()
    line = KeyValueFormatter().format(record)
    after = time.monotonic_ns()
    m = re.fullmatch(r'ts=\S+Z mono=(\d+) level=info pid=\d+ logger=vfkeep\.test msg=hello k="v w"', line)
    assert m, line
    assert before <= int(m.group(1)) <= after


def test_held_lines_are_written_later_in_order_with_the_time_they_were_logged(tmp_path):
    """`hold_lines` (the old worker's save, the host's handoff: no line formatted or written in the servicing
    window) keeps each line's `mono` from when it was logged; `write_held_lines` writes them in order, and so
    does the handler's close (`logging.shutdown`, at a worker's exit)."""
    from vfkeep import log as vlog

    with process_log("held", tmp_path):
        path = tmp_path / "held.log"
        log = logging.getLogger("vfkeep.test")
        vlog.hold_lines()
        before = time.monotonic_ns()
        vlog.kv(log, logging.INFO, "first", n=1)
        vlog.kv(log, logging.INFO, "second", n=2)
        logged = time.monotonic_ns()
        assert path.read_text() == ""
        vlog.write_held_lines()
        lines = path.read_text().splitlines()
        assert [re.search(r"msg=(\w+)", line).group(1) for line in lines] == ["first", "second"]
        monos = [int(re.search(r"mono=(\d+)", line).group(1)) for line in lines]
        assert before <= monos[0] <= monos[1] <= logged
        vlog.hold_lines()
        vlog.kv(log, logging.INFO, "third")
        logging.getLogger().handlers[0].close()
        assert path.read_text().splitlines()[-1].endswith("msg=third")


def test_a_line_logged_at_a_given_time_keeps_it(tmp_path):
    """`kv_at`: a line about a moment on a critical path, written once the path is done (the restarted relay's
    "relay running"), carries that moment's `mono`, held or not."""
    from vfkeep import log as vlog

    with process_log("at", tmp_path):
        log = logging.getLogger("vfkeep.test")
        then = time.monotonic_ns() - 5_000_000
        vlog.kv_at(log, logging.INFO, then, "earlier", n=1)
        vlog.hold_lines()
        vlog.kv_at(log, logging.INFO, then + 1, "held")
        vlog.write_held_lines()
        lines = (tmp_path / "at.log").read_text().splitlines()
        assert [int(re.search(r"mono=(\d+)", line).group(1)) for line in lines] == [then, then + 1]
        assert "msg=earlier n=1" in lines[0]


def test_a_held_kv_line_becomes_a_record_only_when_written_and_reads_as_if_it_had_not_been_held(tmp_path, monkeypatch):
    """While lines are held, `kv` keeps a line's parts (making its record cost the new worker 10-25 us a line inside
    the blackout): no record is made until `write_held_lines`, and the line then reads as an unheld one would,
    with the wall time and `mono` of its logging."""
    from vfkeep import log as vlog

    made = []
    make = logging.Logger.makeRecord
    monkeypatch.setattr(logging.Logger, "makeRecord", lambda self, *a, **k: made.append(a[4]) or make(self, *a, **k))
    with process_log("parts", tmp_path):
        log = logging.getLogger("vfkeep.test.parts")
        vlog.kv(log, logging.INFO, "unheld", k="v w", n=1)
        vlog.hold_lines()
        before_ns, before_s = time.monotonic_ns(), time.time()
        vlog.kv(log, logging.INFO, "held", k="v w", n=1)
        vlog.kv_at(log, logging.INFO, 42, "held at", n=2)
        vlog.kv(log, logging.DEBUG, "below the level")
        assert made == ["unheld"]
        vlog.write_held_lines()
        assert made == ["unheld", "held", "held at"]
        unheld, held, held_at = (tmp_path / "parts.log").read_text().splitlines()
    assert held.split(" mono=")[1].split(" ", 1)[1] == unheld.split(" mono=")[1].split(" ", 1)[1].replace(
        "msg=unheld", "msg=held")
    assert before_ns <= int(re.search(r"mono=(\d+)", held).group(1)) <= time.monotonic_ns()
    assert " mono=42 " in held_at and held_at.endswith("msg=\"held at\" n=2")
    ts = re.search(r"ts=(\S+)Z", held).group(1)
    assert time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(before_s)) <= ts[:19]


def test_a_held_kv_line_still_reaches_a_handler_of_its_own_logger_at_once(tmp_path):
    """Only the process's one holding handler is skipped to: a logger with a handler of its own (a test's) gets the
    line as it is logged."""
    from vfkeep import log as vlog

    with process_log("own", tmp_path):
        log = logging.getLogger("vfkeep.test.own")
        seen = []
        handler = logging.Handler()
        handler.emit = lambda record: seen.append(record.getMessage())
        log.addHandler(handler)
        try:
            vlog.hold_lines()
            vlog.kv(log, logging.INFO, "now")
            assert seen == ["now"] and (tmp_path / "own.log").read_text() == ""
            vlog.write_held_lines()
            assert (tmp_path / "own.log").read_text().endswith("msg=now\n")
        finally:
            log.removeHandler(handler)


def test_after_cache_levels_a_first_line_looks_no_level_up(tmp_path, monkeypatch):
    """`cache_levels` (a worker, before it serves): the first line on a logger its restore uses does not walk the
    logger hierarchy for its level inside the blackout."""
    from vfkeep import log as vlog

    with process_log("levels", tmp_path):
        log = logging.getLogger("vfkeep.test.levels")
        vlog.cache_levels()
        looked_up = []
        monkeypatch.setattr(logging.Logger, "getEffectiveLevel", lambda self: looked_up.append(self.name) or 0)
        vlog.kv(log, logging.INFO, "first")
        vlog.kv(log, logging.DEBUG, "below the level")
        assert looked_up == []
        vlog.write_held_lines()
        assert (tmp_path / "levels.log").read_text().endswith("msg=first\n")
