"""`vfkeep layout` output checked against the hand-written spec tables of test_gdma_layout.py."""
import json
import pathlib
import subprocess
import sys

import pytest
from click.testing import CliRunner

from test_gdma_layout import APPENDIX_B, APPENDIX_L, BITFIELDS, BODY_CONSTANTS, STRUCTS
from vfkeep.cli import main


@pytest.fixture(scope="module")
def layout() -> dict:
    exe = pathlib.Path(sys.executable).with_name("vfkeep")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "vfkeep.cli"]
    out = subprocess.run([*argv, "layout", "--json"], check=True, capture_output=True, text=True, timeout=30)
    return json.loads(out.stdout)


def test_structs_match_spec(layout):
    structs = layout["structs"]
    assert set(structs) == set(STRUCTS) | set(BITFIELDS)
    for name, (size, fields) in STRUCTS.items():
        got = structs[name]
        assert got["size"] == size, name
        assert got["fields"] == {f: {"offset": o, "size": s} for f, (o, s) in fields.items()}, name
        assert got["bitfields"] == {}, name
    for name, (nbytes, fields) in BITFIELDS.items():
        got = structs[name]
        assert got["size"] == nbytes, name
        assert got["bitfields"] == {f: {"bit": b, "width": w} for f, (b, w) in fields.items()}, name


def test_constants_match_spec(layout):
    consts = layout["constants"]
    for table in (APPENDIX_B, APPENDIX_L, BODY_CONSTANTS):
        assert {n: consts.get(n) for n in table} == table


def test_table_output():
    result = CliRunner().invoke(main, ["layout"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for text in ("RegMap", "vf_gdma_sriov_shared_reg_start", "bits 32–62", "DRV_GD_DRV_CAP_FLAGS1", "0x8014068"):
        assert text in result.output
