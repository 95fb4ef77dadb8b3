"""`vfkeep smoke`: the keepalive handover on the test device, run as a user would."""
from __future__ import annotations

import os
import subprocess
import sys


def test_smoke_command_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "vfkeep.cli", "smoke", "--run-dir", str(run_dir)],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "keepalive handover OK" in out.stdout and "FAIL" not in out.stdout
    assert "latched=[1]" in out.stdout
    assert {"testdev.log", "driver1.log", "driver2.log", "saved-state.json"} <= {p.name for p in run_dir.iterdir()}
    assert not (run_dir / "testdev.sock").exists()  # the device process was ended
