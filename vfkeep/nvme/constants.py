"""Every named value of spec `nvme.md` (body sections and the appendix), spelled as the spec spells it.

Code families are `IntEnum`s (readable logs); each member is also a plain
module-level name (`IDENTIFY`, `SC_INVALID_FIELD`, ...).
"""
from __future__ import annotations

import enum


def _export(cls: type[enum.Enum]) -> type[enum.Enum]:
    """Publish each enum member under its own name at module level."""
    globals().update(cls.__members__)
    return cls


PAGE_SIZE = 4096
PAGE_SHIFT = 12

# §1 PCI identity
PCI_VENDOR_ID = 0x1414
PCI_DEVICE_ID = 0xC03E
PCI_FUSED_DEVICE_ID = 0xB111  # §11.6 fused-keepalive identity (driver workaround; not emulated)
PCI_CLASS_CODE = 0x01  # mass storage
PCI_SUBCLASS = 0x08  # non-volatile memory
PCI_PROG_IF = 0x02  # NVMe
PCI_REVISION_ID = 0
BAR0_LEN = 0x10000
PCI_MSIX_BAR = 4

# §2.1 BAR0 register offsets
REG_CAP = 0x00
REG_VS = 0x08
REG_INTMS = 0x0C
REG_INTMC = 0x10
REG_CC = 0x14
REG_RSVD = 0x18
REG_CSTS = 0x1C
REG_NSSR = 0x20
REG_AQA = 0x24
REG_ASQ = 0x28
REG_ACQ = 0x30
REG_CMBLOC = 0x38
REG_CMBSZ = 0x3C
REG_BPINFO = 0x40
REG_BPRSEL = 0x44
REG_BPMBL = 0x48
DOORBELL_BASE = 0x1000
#: 64-bit registers (8-byte or 4-byte-half access); every other register is exactly 4 bytes.
REGS_64 = (REG_CAP, REG_ASQ, REG_ACQ, REG_BPMBL)

# §2.2 emulator CAP values, §16 controller constants
NVME_VERSION = 0x00020000
MAX_QES = 256  # entries per queue (CAP.MQES = MAX_QES - 1)
CAP_TO_500MS = 0xFF  # CAP.TO: 127.5 s
MAX_NSID = 1024
MDTS = 6  # 2^6 pages = 256 KiB
MAX_TRANSFER = PAGE_SIZE << MDTS
MAX_AERS = 4
IO_DEPTH_PER_SQ = 8

# §2.4 CC values the driver writes
CC_ENABLE_VALUE = 0x00460001  # EN=1, CSS=0, MPS=0, AMS=0, SHN=0, IOSQES=6, IOCQES=4
IOSQES = 6
IOCQES = 4
SHST_NORMAL = 0b00
SHST_IN_PROGRESS = 0b01
SHST_COMPLETE = 0b10
CSTS_GONE = 0xFFFFFFFF  # a read of all ones: the device is gone

# §4 queue entries
SQE_SIZE = 64
CQE_SIZE = 16

# §5 PRPs
INVALID_PAGE_ADDR = 0xFFFF_FFFF_FFFF_F000
PRP_ENTRY_SIZE = 8
PRP_ENTRIES_PER_PAGE = PAGE_SIZE // PRP_ENTRY_SIZE

# §11 driver constants
SQ_BYTES = 16 * 1024  # 4 pages: up to 256 x 64 B
CQ_BYTES = 4 * 1024  # 1 page: up to 256 x 16 B
QUEUE_PAIR_ALLOCATOR_PAGES = 64  # PRP lists, admin data (128 with bounce buffering; vfkeep never bounces)
QUEUE_PAIR_PAGES = SQ_BYTES // PAGE_SIZE + CQ_BYTES // PAGE_SIZE + QUEUE_PAIR_ALLOCATOR_PAGES  # 69
QUEUE_PAIR_MEM_LEN = QUEUE_PAIR_PAGES * PAGE_SIZE  # 282,624 bytes
CID_KEY_BITS = 10
CID_KEY_MASK = (1 << CID_KEY_BITS) - 1
CID_SEQ_STEP = 1 << CID_KEY_BITS  # next_cid_high_bits advances by 0x400 per command
MAX_PENDING = 1 << CID_KEY_BITS
ADMIN_QUEUE_ENTRIES = 256
AQA_256 = 0x00FF00FF
IDENTIFY_SIZE = 4096

# §6 feature-specific field values
CHANGED_NS_LOG_CDW10 = 0x03FF0004  # LID 4, NUMDL 1023 (4096 B), RAE 0
AEN_NS_CHANGED_DW0 = 0x00040002  # NOTICE, info 0 (namespace attribute changed), log page 4
CHANGED_NS_ALL = 0xFFFFFFFF  # first entry of a changed-namespace list: "more than 1024 changed"
LOG_NSID_ALL = 0xFFFFFFFF


@_export
class AdminOpcode(enum.IntEnum):
    """Appendix: admin opcodes."""

    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    KEEP_ALIVE = 0x18
    DOORBELL_BUFFER_CONFIG = 0x7C


@_export
class NvmOpcode(enum.IntEnum):
    """Appendix: NVM command set opcodes (prefixed: FLUSH/WRITE/READ would clash with admin codes)."""

    NVM_FLUSH = 0x00
    NVM_WRITE = 0x01
    NVM_READ = 0x02
    NVM_DSM = 0x09
    NVM_RESERVATION_REGISTER = 0x0D
    NVM_RESERVATION_REPORT = 0x0E
    NVM_RESERVATION_ACQUIRE = 0x11
    NVM_RESERVATION_RELEASE = 0x15


@_export
class Cns(enum.IntEnum):
    """IDENTIFY CDW10.CNS."""

    CNS_NAMESPACE = 0
    CNS_CONTROLLER = 1
    CNS_ACTIVE_NAMESPACES = 2
    CNS_DESCRIPTOR_NAMESPACE = 3
    CNS_SPECIFIC_CONTROLLER_IO_COMMAND_SET = 6


@_export
class FeatureId(enum.IntEnum):
    FEAT_ARBITRATION = 0x01
    FEAT_POWER_MGMT = 0x02
    FEAT_TEMP_THRESHOLD = 0x04
    FEAT_ERROR_RECOVERY = 0x05
    FEAT_VOLATILE_WRITE_CACHE = 0x06
    FEAT_NUMBER_OF_QUEUES = 0x07
    FEAT_INTERRUPT_COALESCING = 0x08
    FEAT_INTERRUPT_VECTOR_CONFIG = 0x09
    FEAT_ASYNC_EVENT_CONFIG = 0x0B
    FEAT_RESERVATION_PERSISTENCE = 0x83


@_export
class LogPageId(enum.IntEnum):
    LOG_SUPPORTED = 0x00
    LOG_ERROR = 0x01
    LOG_HEALTH = 0x02
    LOG_FW_SLOT = 0x03
    LOG_CHANGED_NS_LIST = 0x04


@_export
class AenType(enum.IntEnum):
    AEN_ERROR = 0
    AEN_HEALTH = 1
    AEN_NOTICE = 2
    AEN_IMMEDIATE = 3
    AEN_IO_CMD_SPECIFIC = 6
    AEN_VENDOR = 7


AEN_NOTICE_NS_ATTRIBUTE_CHANGED = 0


@_export
class Status(enum.IntEnum):
    """§9: the 11-bit status `(SCT << 8) | SC`; non-zero is an error."""

    SC_SUCCESS = 0x000
    SC_INVALID_COMMAND_OPCODE = 0x001
    SC_INVALID_FIELD = 0x002
    SC_DATA_TRANSFER_ERROR = 0x004
    SC_INTERNAL_ERROR = 0x006  # [NVMe spec] Internal Error: what an injected admin failure answers by default
    SC_INVALID_NAMESPACE_OR_FORMAT = 0x00B
    SC_COMMAND_SEQUENCE_ERROR = 0x00C
    SC_LBA_OUT_OF_RANGE = 0x080
    SC_RESERVATION_CONFLICT = 0x083
    SC_COMPLETION_QUEUE_INVALID = 0x100
    SC_INVALID_QUEUE_IDENTIFIER = 0x101
    SC_INVALID_QUEUE_SIZE = 0x102
    SC_ASYNC_EVENT_LIMIT_EXCEEDED = 0x105
    SC_INVALID_INTERRUPT_VECTOR = 0x108
    SC_INVALID_LOG_PAGE = 0x109
    SC_INVALID_QUEUE_DELETION = 0x10C
    SC_FEATURE_NOT_SAVEABLE = 0x10D


def status_name(value: int) -> str:
    try:
        return Status(value).name
    except ValueError:
        return f"STATUS_{value:#05x}"


def admin_name(opcode: int) -> str:
    try:
        return AdminOpcode(opcode).name
    except ValueError:
        return f"ADMIN_{opcode:#04x}"


def nvm_name(opcode: int) -> str:
    try:
        return NvmOpcode(opcode).name.removeprefix("NVM_")
    except ValueError:
        return f"NVM_{opcode:#04x}"


def opcode_transfers_to_host(opcode: int) -> bool:
    """§4.1: opcode bit 1 = controller→host data."""
    return bool(opcode & 0b10)


def opcode_transfers_to_controller(opcode: int) -> bool:
    """§4.1: opcode bit 0 = host→controller data."""
    return bool(opcode & 0b01)


__all__ = [name for name in dir() if name.isupper() and not name.startswith("_")] + [
    "AdminOpcode", "NvmOpcode", "Cns", "FeatureId", "LogPageId", "AenType", "Status", "status_name",
    "admin_name", "nvm_name", "opcode_transfers_to_host", "opcode_transfers_to_controller",
]
