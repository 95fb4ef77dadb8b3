"""NVMe wire layouts pinned against spec nvme.md (tables transcribed by hand from the spec, never derived
from vfkeep.nvme)."""
import ctypes

import pytest

import vfkeep.nvme as nvme
from vfkeep.gdma.base import struct_layout

STRUCTS = {
    # §4.1
    "Command": (64, {"cdw0": (0, 4), "nsid": (4, 4), "cdw2": (8, 4), "cdw3": (12, 4), "mptr": (16, 8),
                     "prp1": (24, 8), "prp2": (32, 8), "cdw10": (40, 4), "cdw11": (44, 4), "cdw12": (48, 4),
                     "cdw13": (52, 4), "cdw14": (56, 4), "cdw15": (60, 4)}),
    # §4.2
    "Completion": (16, {"dw0": (0, 4), "dw1": (4, 4), "sqhd": (8, 2), "sqid": (10, 2), "cid": (12, 2),
                        "status": (14, 2)}),
    # §8 and §16
    "IdentifyController": (4096, {"vid": (0, 2), "ssvid": (2, 2), "sn": (4, 20), "mn": (24, 40), "fr": (64, 8),
                                  "ieee": (73, 3), "mdts": (77, 1), "cntlid": (78, 2), "ver": (80, 4),
                                  "rtd3r": (84, 4), "rtd3e": (88, 4), "oaes": (92, 4), "cntrltype": (111, 1),
                                  "oacs": (256, 2), "aerl": (259, 1), "frmw": (260, 1), "elpe": (262, 1),
                                  "sqes": (512, 1), "cqes": (513, 1), "nn": (516, 4), "oncs": (520, 2),
                                  "vwc": (525, 1), "subnqn": (768, 256)}),
    "IdentifyNamespace": (4096, {"nsze": (0, 8), "nsfeat": (24, 1), "nlbaf": (25, 1), "flbas": (26, 1),
                                 "rescap": (31, 1), "npdg": (68, 2), "lbaf": (128, 64)}),
    # §7
    "DsmRange": (16, {"context_attributes": (0, 4), "lba_count": (4, 4), "starting_lba": (8, 8)}),
}

BITFIELDS = {
    # §2.2
    "Cap": {"mqes": (0, 16), "cqr": (16, 1), "ams": (17, 2), "to_500ms": (24, 8), "dstrd": (32, 4),
            "nssrs": (36, 1), "css": (37, 8), "bps": (45, 1), "cps": (46, 2), "mpsmin": (48, 4), "mpsmax": (52, 4)},
    # §2.3
    "Aqa": {"asqs": (0, 12), "acqs": (16, 12)},
    # §2.4
    "Cc": {"en": (0, 1), "css": (4, 3), "mps": (7, 4), "ams": (11, 3), "shn": (14, 2), "iosqes": (16, 4),
           "iocqes": (20, 4), "crime": (24, 1)},
    # §2.5
    "Csts": {"rdy": (0, 1), "cfs": (1, 1), "shst": (2, 2), "nssro": (4, 1), "pp": (5, 1), "st": (6, 1)},
    # §4.1, §4.2
    "Cdw0": {"opcode": (0, 8), "fuse": (8, 2), "psdt": (14, 2), "cid": (16, 16)},
    "CompletionStatus": {"p": (0, 1), "sc": (1, 8), "sct": (9, 3), "crd": (12, 2), "m": (14, 1), "dnr": (15, 1)},
    # §6
    "CreateIoCqCdw11": {"pc": (0, 1), "ien": (1, 1), "iv": (16, 16)},
    "CreateIoSqCdw11": {"pc": (0, 1), "qprio": (1, 2), "cqid": (16, 16)},
    "AsyncEventDw0": {"event_type": (0, 3), "info": (8, 8), "log_page": (16, 8)},
    # §7
    "ReadWriteCdw12": {"nlb": (0, 16), "fua": (30, 1), "lr": (31, 1)},
    # §8
    "LbaFormat": {"ms": (0, 16), "lbads": (16, 8), "rp": (24, 2)},
}


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_layout(name):
    size, fields = STRUCTS[name]
    layout = struct_layout(getattr(nvme, name))
    assert layout["size"] == size
    for field, (offset, length) in fields.items():
        assert (layout["fields"][field]["offset"], layout["fields"][field]["size"]) == (offset, length), field


@pytest.mark.parametrize("name", sorted(BITFIELDS))
def test_bitfield_layout(name):
    layout = struct_layout(getattr(nvme, name))["bitfields"]
    for field, (bit, width) in BITFIELDS[name].items():
        assert (layout[field]["bit"], layout[field]["width"]) == (bit, width), field


def test_named_values():
    assert nvme.Cc.from_int(nvme.CC_ENABLE_VALUE).to_int() == 0x00460001
    assert nvme.AQA_256 == 0x00FF00FF and nvme.CHANGED_NS_LOG_CDW10 == 0x03FF0004
    assert nvme.QUEUE_PAIR_MEM_LEN == 282_624 and nvme.QUEUE_PAIR_PAGES == 69
    assert nvme.INVALID_PAGE_ADDR == 0xFFFF_FFFF_FFFF_F000
    assert (nvme.doorbell_offset(0, False), nvme.doorbell_offset(0, True), nvme.doorbell_offset(1, False),
            nvme.doorbell_offset(1, True)) == (0x1000, 0x1004, 0x1008, 0x100C)
    assert nvme.AEN_NS_CHANGED_DW0 == nvme.AsyncEventDw0(event_type=2, info=0, log_page=4).to_int()
    assert (nvme.IDENTIFY, nvme.CREATE_IO_CQ, nvme.CREATE_IO_SQ, nvme.ASYNC_EVENT_REQUEST) == (6, 5, 1, 0x0C)
    assert (nvme.NVM_READ, nvme.NVM_WRITE, nvme.NVM_FLUSH, nvme.NVM_DSM) == (2, 1, 0, 9)
    assert (nvme.SC_INVALID_QUEUE_IDENTIFIER, nvme.SC_ASYNC_EVENT_LIMIT_EXCEEDED) == (0x101, 0x105)
    assert nvme.status_of(nvme.status_field(0x102, 1)) == 0x102
    assert ctypes.sizeof(nvme.Command) == nvme.SQE_SIZE and ctypes.sizeof(nvme.Completion) == nvme.CQE_SIZE
