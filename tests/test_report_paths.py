"""Report paths and replay sources are checked before minutes of work, not after (new-user review item 6):
one line `vfkeep: COMMAND: cause`, exit 2, nothing started."""
import subprocess

import pytest

from helpers import vfkeep


def usage_line(r: subprocess.CompletedProcess, command: str) -> str:
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr and r.stdout == "", r
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"vfkeep: {command}: "), line
    return line


@pytest.mark.parametrize("command", [("chaos", "--servicings", "1"), ("demo", "--servicings", "1")])
def test_a_report_path_in_a_missing_directory_is_refused_first(tmp_path, command):
    """The campaign (or demo) ran to the end and then died writing the report; the demo's error came as
    {"ok": false} JSON, its --json PATH taken for the JSON-errors flag."""
    for path, cause in ((tmp_path / "nodir" / "r.json", "does not exist"), (tmp_path, "is a directory")):
        line = usage_line(vfkeep(*command, "--json", str(path)), command[0])
        assert "--json" in line and cause in line, line


@pytest.mark.parametrize("value, cause", [
    ("abc", "neither a servicing index nor an existing report file"),
    ("-5", "negative"),
    ("{d}/missing.json", "neither a servicing index nor an existing report file"),
    ("{d}/notes.txt", "is not a chaos report"),
    ("{d}/other.json", "is not a chaos report"),
])
def test_a_bad_replay_is_bad_usage(tmp_path, value, cause):
    (tmp_path / "notes.txt").write_text("not json")
    (tmp_path / "other.json").write_text('{"results": []}')
    line = usage_line(vfkeep("chaos", "--replay", value.format(d=tmp_path)), "chaos")
    assert "--replay" in line and cause in line, line
