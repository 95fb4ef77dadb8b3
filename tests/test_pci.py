"""The one PCI identity builder (vfkeep.pci) behind the MANA VF, the NVMe controller and the test device."""
from __future__ import annotations

import struct

from vfkeep import pci
from vfkeep.device.pci import ConfigSpace as ManaConfigSpace
from vfkeep.nvme_device.pci import ConfigSpace as NvmeConfigSpace
from vfkeep.nvme_device.pci import bar4_size


def u32(cs: pci.ConfigSpace, offset: int) -> int:
    return struct.unpack("<I", cs.read(offset, 4))[0]


def test_header_fields_bar_sizing_and_msix_capability():
    cs = pci.ConfigSpace(0x1234, 0x5678, class_code=0x010802, revision=3, subsystem_vendor_id=0xAB,
                         subsystem_id=0xCD, bars={0: 0x4000, 4: 0x1000}, msix=pci.Msix(4, 8, 0x80))
    assert u32(cs, 0x00) == 0x5678_1234 and u32(cs, 0x08) == 0x0108_0203 and u32(cs, 0x2C) == 0x00CD_00AB
    assert u32(cs, 0x04) >> 16 == 0x10 and cs.read(0x34, 1)[0] == pci.MSIX_CAP_OFFSET  # capability list
    assert struct.unpack_from("<BBHII", cs.read(pci.MSIX_CAP_OFFSET, 12)) == (0x11, 0, 7, 4, 0x84)
    for index, size in ((0, 0x4000), (4, 0x1000)):  # sizing: all ones reads back the size, 64-bit memory
        cs.write(0x10 + 4 * index, b"\xff" * 8)
        assert u32(cs, 0x10 + 4 * index) == (~(size - 1) & 0xFFFFFFFF) | 0x4
    cs.write(0x00, b"\xff\xff\xff\xff")  # ids are read-only
    assert u32(cs, 0x00) == 0x5678_1234
    cs.write(pci.MSIX_CAP_OFFSET + 2, b"\xff\xff")
    assert cs.read(pci.MSIX_CAP_OFFSET + 2, 2) == struct.pack("<H", 0xC000 | 7)


def test_a_function_without_bars_has_nothing_writable():
    cs = pci.ConfigSpace(0x1AF4, 0x1, class_code=0xFF0000)
    before = cs.read(0, pci.CONFIG_SIZE)
    cs.write(0, b"\xff" * pci.CONFIG_SIZE)
    assert cs.read(0, pci.CONFIG_SIZE) == before and u32(cs, 0x08) == 0xFF00_0000


def test_msix_bar_stores_the_table_and_the_pba_reads_zero():
    bar = pci.MsixBar(vectors=2, size=4096)
    bar.write(0, b"\x11" * 40)
    assert bar.read(0, 40) == b"\x11" * 32 + bytes(8)


def test_mana_and_nvme_identities():
    assert ManaConfigSpace().read(0, 4) == (0x1414 | 0x00BA << 16).to_bytes(4, "little")
    nvme = NvmeConfigSpace(17)
    assert nvme.read(0x09, 3) == bytes((0x02, 0x08, 0x01))  # NVM Express / NVM / mass storage
    assert struct.unpack_from("<BBHII", nvme.read(pci.MSIX_CAP_OFFSET, 12))[2:] == (16, 4, 17 * 16 | 4)
    assert bar4_size(17) == 4096 and bar4_size(300) == 8192
