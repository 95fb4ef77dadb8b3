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


def test_nvme_layout_matches_spec():
    """`vfkeep layout --device nvme --json`: the NVMe structs and constants, as spec nvme.md tables them."""
    from test_nvme_layout import BITFIELDS as NVME_BITFIELDS, STRUCTS as NVME_STRUCTS

    result = CliRunner().invoke(main, ["layout", "--device", "nvme", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    structs = data["structs"]
    for name, (size, fields) in NVME_STRUCTS.items():
        assert structs[name]["size"] == size, name
        for field, (offset, length) in fields.items():
            assert structs[name]["fields"][field] == {"offset": offset, "size": length}, (name, field)
    for name, fields in NVME_BITFIELDS.items():
        for field, (bit, width) in fields.items():
            assert structs[name]["bitfields"][field] == {"bit": bit, "width": width}, (name, field)
    assert not set(structs) & set(STRUCTS)  # no GDMA struct in the NVMe listing
    consts = data["constants"]
    assert (consts["IDENTIFY"], consts["CREATE_IO_CQ"], consts["NVM_READ"], consts["SQE_SIZE"]) == (6, 5, 2, 64)
    table = CliRunner().invoke(main, ["layout", "--device", "nvme"], env={"COLUMNS": "160"})
    assert table.exit_code == 0 and "NVMe wire structs" in table.output and "iocqes" in table.output
    bad = CliRunner().invoke(main, ["layout", "--device", "scsi"])
    assert bad.exit_code == 2 and "scsi" in bad.output


@pytest.mark.parametrize("device", ["mana", "nvme"])
def test_piped_output_cuts_no_name(device):
    """Piped on 80 columns the tables folded field names onto a second line (`vf_gdma_sriov_share` twice: two
    different fields) and cut constant names with `…`. Piped, every struct field and constant is one whole line."""
    data = json.loads(CliRunner().invoke(main, ["layout", "--device", device, "--json"]).output)
    result = CliRunner().invoke(main, ["layout", "--device", device], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = set(result.output.splitlines())
    for name, s in data["structs"].items():
        assert f"{name}: {s['size']} bytes" in lines
        for field, f in s["fields"].items():
            assert f"{name}.{field}: offset {f['offset']}, {f['size']} bytes" in lines
        for field, b in s["bitfields"].items():
            assert any(line.startswith(f"{name}.{field}: bit") and line.endswith(f"width {b['width']}")
                       for line in lines), (name, field)
    for name, value in data["constants"].items():
        assert f"{name}: {value} ({hex(value)})" in lines
    assert "…" not in result.output
