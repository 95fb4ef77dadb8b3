"""Every named value of spec `gdma.md` (body sections and Appendix B), spelled as the spec spells it.

Code families are `IntEnum`s (for readable logs and exhaustive matching); each
member is also exported as a plain module-level name (`GDMA_CREATE_QUEUE`,
`CQE_TX_OKAY`, ...), so `from vfkeep.gdma import GDMA_CREATE_QUEUE` works.
`vfkeep layout --json` lists every public int in this module.
"""
from __future__ import annotations

import enum
import functools


def _export(cls: type[enum.Enum]) -> type[enum.Enum]:
    """Publish each enum member under its own name at module level."""
    globals().update(cls.__members__)
    return cls


# §1 conventions
PAGE_SIZE = 4096
PAGE_SIZE32 = 4096
PAGE_SIZE64 = 4096

# §4.1 doorbell offsets inside a doorbell page
DB_SQ = 0x000
DB_RQ = 0x400
DB_RQ_CLIENT_DATA = 0x408
DB_CQ = 0x800
DB_EQ = 0xFF8


@_export
class SmcMsgType(enum.IntEnum):
    """§5.2 `SmcProtoHdr.msg_type`."""

    SMC_MSG_TYPE_ESTABLISH_HWC = 1
    SMC_MSG_TYPE_DESTROY_HWC = 2
    SMC_MSG_TYPE_REPORT_HWC_TIMEOUT = 4


SMC_MSG_TYPE_ESTABLISH_HWC_VERSION = 0
SMC_MSG_TYPE_DESTROY_HWC_VERSION = 0
SMC_MSG_TYPE_REPORT_HWC_TIMEOUT_VERSION = 1


@_export
class GdmaQueueType(enum.IntEnum):
    """§6.1; also `ManaCreateWqobjReq.wq_type` (1 = SQ, 2 = RQ)."""

    GDMA_SQ = 1
    GDMA_RQ = 2
    GDMA_CQ = 3
    GDMA_EQ = 4


@_export
class OobSizeCode(enum.IntEnum):
    """§6.2 `WqeParams.inline_client_oob_size`; any other code behaves as CLIENT_OOB_8."""

    CLIENT_OOB_8 = 2
    CLIENT_OOB_24 = 6
    CLIENT_OOB_32 = 7


WQE_ALIGNMENT = 32
OWNER_BITS = 3
OWNER_MASK = 7


@_export
class GdmaEqeType(enum.IntEnum):
    """§6.4 `EqeParams.event_type`."""

    GDMA_EQE_COMPLETION = 3
    GDMA_EQE_TEST_EVENT = 64
    GDMA_EQE_HWC_INIT_EQ_ID_DB = 129
    GDMA_EQE_HWC_INIT_DATA = 130
    GDMA_EQE_HWC_INIT_DONE = 131
    GDMA_EQE_HWC_RECONFIG_DATA = 133
    GDMA_EQE_HWC_RESET_REQUEST = 135


@_export
class HwcReconfigDataType(enum.IntEnum):
    """§6.4 `EqeDataReconfig.data_type`."""

    HWC_DATA_CONFIG_HWC_TIMEOUT = 1
    HWC_DATA_TYPE_HW_VPORT_LINK_CONNECT = 2
    HWC_DATA_TYPE_HW_VPORT_LINK_DISCONNECT = 3


@_export
class HwcInitDataType(enum.IntEnum):
    """§7.2 `HwcInitTypeData.ty`."""

    HWC_INIT_DATA_CQID = 1
    HWC_INIT_DATA_RQID = 2
    HWC_INIT_DATA_SQID = 3
    HWC_INIT_DATA_QUEUE_DEPTH = 4
    HWC_INIT_DATA_MAX_REQUEST = 5
    HWC_INIT_DATA_MAX_RESPONSE = 6
    HWC_INIT_DATA_MAX_NUM_CQS = 7
    HWC_INIT_DATA_PDID = 8
    HWC_INIT_DATA_GPA_MKEY = 9


# §8.1 / §10 message header values
GDMA_STANDARD_HEADER_TYPE = 0
GDMA_MESSAGE_V1 = 1


@_export
class GdmaRequestType(enum.IntEnum):
    """§9.1 GDMA request codes (`GdmaMsgHdr.msg_type`, `msg_type >> 16 == 0`)."""

    GDMA_VERIFY_VF_DRIVER_VERSION = 1
    GDMA_QUERY_MAX_RESOURCES = 2
    GDMA_LIST_DEVICES = 3
    GDMA_REGISTER_DEVICE = 4
    GDMA_DEREGISTER_DEVICE = 5
    GDMA_GENERATE_TEST_EQE = 10
    GDMA_GENERATE_RESET_REQUEST_EQE = 11
    GDMA_CREATE_QUEUE = 12
    GDMA_DISABLE_QUEUE = 13
    GDMA_CREATE_DMA_REGION = 25
    GDMA_DMA_REGION_ADD_PAGES = 26
    GDMA_DESTROY_DMA_REGION = 27
    GDMA_CHANGE_MSIX_FOR_EQ = 81


@_export
class GdmaDevType(enum.IntEnum):
    """§9.2 `GdmaDevId.ty`."""

    GDMA_DEVICE_NONE = 0
    GDMA_DEVICE_HWC = 1
    GDMA_DEVICE_MANA = 2


HWC_DEV_ID_TY = 1
HWC_DEV_ID_INSTANCE = 0
# `HWC_DEV_ID` as the `GdmaDevId` dword (`GdmaDevId.from_int(HWC_DEV_ID)`).
HWC_DEV_ID = 0x00000001

# §9.3 capability flags
DRIVER_CAP_FLAG_1_HWC_TIMEOUT_RECONFIG = 0x08
DRIVER_CAP_FLAG_1_VARIABLE_INDIRECTION_TABLE_SUPPORT = 0x20
DRIVER_CAP_FLAG_1_HW_VPORT_LINK_AWARE = 0x40
DRIVER_CAP_FLAG_1_SELF_RESET_ON_EQE_NOTIFICATION = 0x4000
DRIVER_CAP_FLAG_1_VTL2_REVOKE_SUB_ON_RESET_EQE = 0x10000
DRIVER_CAP_FLAG_1_VTL2_SELECTIVE_REVOKE_SUB_ON_RESET_EQE = 0x8000000
GDMA_PF_CAP_FLAG_1_QUERY_HWC_TIMEOUT = 0x08
GDMA_PF_CAP_FLAG_1_EQE_REQUEST_VF_SELF_RESET = 0x80

# §10 misc
OS_TYPE_OHCL = 0x60
GDMA_PAGE_TYPE_4K = 0
RWQE_SIZE = 32
MAX_RWQE_SIZE = 256
MAX_SWQE_SIZE = 512


@_export
class ManaCommandCode(enum.IntEnum):
    """§11.1 BNIC request codes (device-specific range, `msg_type >> 16 == 2`)."""

    MANA_QUERY_DEV_CONFIG = 0x20001
    MANA_QUERY_STATS = 0x20002
    MANA_CONFIG_VPORT_TX = 0x20003
    MANA_CREATE_WQ_OBJ = 0x20004
    MANA_DESTROY_WQ_OBJ = 0x20005
    MANA_FENCE_RQ = 0x20006
    MANA_CONFIG_VPORT_RX = 0x20007
    MANA_QUERY_VPORT_CONFIG = 0x20008
    MANA_VTL2_ASSIGN_SERIAL_NUMBER = 0x27801
    MANA_VTL2_MOVE_FILTER = 0x27802
    MANA_VTL2_QUERY_FILTER_STATE = 0x27803


MANA_QUERY_DEV_CONFIG_REQUEST_V1 = 1
MANA_QUERY_DEV_CONFIG_RESPONSE_V4 = 4
MANA_VTL2_MOVE_FILTER_REQUEST_V2 = 2
MANA_VTL2_MOVE_FILTER_RESPONSE_V1 = 1
MANA_VTL2_ASSIGN_SERIAL_NUMBER_REQUEST_V1 = 1
MANA_VTL2_ASSIGN_SERIAL_NUMBER_RESPONSE_V1 = 1
MANA_VTL2_QUERY_FILTER_STATE_REQUEST_V1 = 1
MANA_VTL2_QUERY_FILTER_STATE_RESPONSE_V1 = 1


class Tristate(enum.IntEnum):
    """§11.8 `ManaCfgRxSteerReq.rx_enable` / `rss_enable` (u32)."""

    FALSE = 0
    TRUE = 1
    UNKNOWN = 0xFFFFFFFF


TRISTATE_FALSE = Tristate.FALSE
TRISTATE_TRUE = Tristate.TRUE
TRISTATE_UNKNOWN = Tristate.UNKNOWN


@_export
class StatisticsFlags(enum.IntFlag):
    """§11.9 `ManaQueryStatisticsRequest.requested_statistics`: bit i selects response u64 i + 1."""

    STATISTICS_FLAGS_IN_DISCARDS_NO_WQE = 1 << 0
    STATISTICS_FLAGS_IN_ERRORS_RX_VPORT_DISABLED = 1 << 1
    STATISTICS_FLAGS_HC_IN_OCTETS = 1 << 2
    STATISTICS_FLAGS_HC_IN_UCAST_PACKETS = 1 << 3
    STATISTICS_FLAGS_HC_IN_UCAST_OCTETS = 1 << 4
    STATISTICS_FLAGS_HC_IN_MCAST_PACKETS = 1 << 5
    STATISTICS_FLAGS_HC_IN_MCAST_OCTETS = 1 << 6
    STATISTICS_FLAGS_HC_IN_BCAST_PACKETS = 1 << 7
    STATISTICS_FLAGS_HC_IN_BCAST_OCTETS = 1 << 8
    STATISTICS_FLAGS_OUT_ERRORS_GF_DISABLED = 1 << 9
    STATISTICS_FLAGS_OUT_ERRORS_VPORT_DISABLED = 1 << 10
    STATISTICS_FLAGS_OUT_ERRORS_INVALID_VPORT_OFFSET_PACKETS = 1 << 11
    STATISTICS_FLAGS_OUT_ERRORS_VLAN_ENFORCEMENT = 1 << 12
    STATISTICS_FLAGS_OUT_ERRORS_ETH_TYPE_ENFORCEMENT = 1 << 13
    STATISTICS_FLAGS_OUT_ERRORS_SA_ENFORCEMENT = 1 << 14
    STATISTICS_FLAGS_OUT_ERRORS_SQPDID_ENFORCEMENT = 1 << 15
    STATISTICS_FLAGS_OUT_ERRORS_CQPDID_ENFORCEMENT = 1 << 16
    STATISTICS_FLAGS_OUT_ERRORS_MTU_VIOLATION = 1 << 17
    STATISTICS_FLAGS_OUT_ERRORS_INVALID_OOB = 1 << 18
    STATISTICS_FLAGS_HC_OUT_OCTETS = 1 << 19
    STATISTICS_FLAGS_HC_OUT_UCAST_PACKETS = 1 << 20
    STATISTICS_FLAGS_HC_OUT_UCAST_OCTETS = 1 << 21
    STATISTICS_FLAGS_HC_OUT_MCAST_PACKETS = 1 << 22
    STATISTICS_FLAGS_HC_OUT_MCAST_OCTETS = 1 << 23
    STATISTICS_FLAGS_HC_OUT_BCAST_PACKETS = 1 << 24
    STATISTICS_FLAGS_HC_OUT_BCAST_OCTETS = 1 << 25


STATISTICS_FLAGS_ALL = 0x3FFFFFF


# §12.1 `ManaTxShortOob.pkt_fmt`
MANA_SHORT_PKT_FMT = 0
MANA_LONG_PKT_FMT = 1
# §12.2 `ManaCqeHeader.client_type`
MANA_CQE_COMPLETION = 1


@_export
class CqeType(enum.IntEnum):
    """§12.2 `ManaCqeHeader.cqe_type`."""

    CQE_INVALID = 0
    CQE_RX_OKAY = 1
    CQE_RX_COALESCED_4 = 2
    CQE_RX_OBJECT_FENCE = 3
    CQE_RX_TRUNCATED = 4
    CQE_TX_OKAY = 32
    CQE_TX_SA_DROP = 33
    CQE_TX_MTU_DROP = 34
    CQE_TX_INVALID_OOB = 35
    CQE_TX_INVALID_ETH_TYPE = 36
    CQE_TX_HDR_PROCESSING_ERROR = 37
    CQE_TX_VF_DISABLED = 38
    CQE_TX_VPORT_IDX_OUT_OF_RANGE = 39
    CQE_TX_VPORT_DISABLED = 40
    CQE_TX_VLAN_TAGGING_VIOLATION = 41
    CQE_TX_GDMA_ERR = 42


# Appendix B — wire-derived labels
SMC_HDR_OFFSET = 28
GDMA_DEVICE_SPECIFIC_MSG_SHIFT = 16
WQE_MAX_SIZE = 512
WQE_SGL_OFFSET_OOB8 = 16
WQE_SGL_OFFSET_OOB24 = 32
WQE_SGL_OFFSET_OOB32 = 48
OWNER_COUNT_SHIFT_IN_LAST_BYTE = 5
CFG_RX_INDIR_TAB_OFFSET = 112

# Appendix B — PCI identity (§2); the subsystem ids are labels given here
PCI_VENDOR_ID = 0x1414
PCI_DEVICE_ID = 0x00BA
PCI_REVISION_ID = 1
PCI_CLASS_CODE = 0x02
PCI_SUBCLASS = 0x00
PCI_PROG_IF = 0x00
PCI_SUBSYSTEM_VENDOR_ID = 0
PCI_SUBSYSTEM_ID = 0
PCI_MSIX_BAR = 4
PCI_MSIX_VECTORS = 64
PCI_MSIX_PBA_OFFSET = 1024

# Appendix B — reference emulator
EMU_BAR0_SIZE = 8192
EMU_REGMAP_OFFSET = 0
EMU_REGMAP_SIZE = 40
EMU_SHMEM_OFFSET = 40
EMU_SHMEM_SIZE = 32
EMU_DB_ZONE_OFFSET = 4096
EMU_DB_PAGE_SIZE = 4096
EMU_DB_PAGE_COUNT = 1
EMU_MAJOR_VERSION = 1
EMU_MINOR_VERSION = 0
EMU_MICRO_VERSION = 1
EMU_QUEUE_ID_OFFSET = 24
ID_OFFSET = EMU_QUEUE_ID_OFFSET  # the §6.1 name of the same value
EMU_NUM_SQ = 64
EMU_NUM_RQ = 64
EMU_NUM_CQ = 128
EMU_NUM_EQ = 64
EMU_MAX_DB = 1
EMU_MAX_MST = 1
EMU_MAX_CQ_MOD_CTX = 0
EMU_MAX_MOD_CQ = 0
EMU_MAX_MSIX = 64
EMU_HWC_DOORBELL = 0
EMU_HWC_QUEUE_DEPTH = 1
EMU_HWC_MAX_REQUEST = 4096
EMU_HWC_MAX_RESPONSE = 4096
EMU_HWC_MAX_NUM_CQS = 128
EMU_HWC_PDID = 0
EMU_HWC_GPA_MKEY = 0
EMU_HWC_INIT_EQE_COUNT = 11
EMU_HWC_MAX_MSG_SIZE = 4096
EMU_MANA_DEV_INSTANCE = 1
EMU_LIST_DEVICES_COUNT = 2
EMU_REGISTER_PDID = 0
EMU_REGISTER_GPA_MKEY = 0
EMU_REGISTER_DB_ID = 0
EMU_MAX_NUM_EQS = 64
EMU_VPORT_MAX_NUM_SQ = 1
EMU_VPORT_MAX_NUM_RQ = 1
EMU_NUM_INDIRECTION_ENT = 128
EMU_TX_VPORT_OFFSET = 0
EMU_SHORT_FORM_ALLOWED = 1
EMU_MAX_RX_OUTSTANDING = 256
EMU_LSO_MAX_HEADER_SGE = 256
EMU_FAILURE_STATUS = 1
EMU_DMA_REGION_FIRST_HANDLE = 1

# Appendix B — reference driver
DRV_HWC_EQ_PAGE = 0
DRV_HWC_CQ_PAGE = 1
DRV_HWC_RQ_PAGE = 2
DRV_HWC_SQ_PAGE = 3
DRV_HWC_REQUEST_PAGE = 4
DRV_HWC_RESPONSE_PAGE = 5
DRV_HWC_NUM_PAGES = 6
DRV_HWC_SWQE_SIZE = 64
DRV_HWC_RWQE_PARAMS = 0x00000201
DRV_HWC_SWQE_PARAMS = 0x00000601
DRV_HWC_MSIX = 0
HWC_WARNING_TIME_IN_MS = 3000
HWC_WARNING_INCREASE_IN_MS = 1000
HWC_TIMEOUT_DEFAULT_IN_MS = 10000
HWC_TIMEOUT_FOR_SHUTDOWN_IN_MS = 100
HWC_POLL_TIMEOUT_IN_MS = 10000
HWC_INTERRUPT_POLL_WAIT_MIN_MS = 20
HWC_INTERRUPT_POLL_WAIT_MAX_MS = 500
DRV_TX_MAX_SGE_SHORT_OOB = 31
DRV_TX_MAX_SGE_LONG_OOB = 30
DRV_DMA_REGION_MAX_PAGES = 16
DRV_INDIR_TABLE_ENTRIES = 128
DRV_GDMA_PROTOCOL_VER = 1
DRV_GD_DRV_CAP_FLAGS1 = (
    DRIVER_CAP_FLAG_1_HWC_TIMEOUT_RECONFIG
    | DRIVER_CAP_FLAG_1_VARIABLE_INDIRECTION_TABLE_SUPPORT
    | DRIVER_CAP_FLAG_1_HW_VPORT_LINK_AWARE
    | DRIVER_CAP_FLAG_1_SELF_RESET_ON_EQE_NOTIFICATION
    | DRIVER_CAP_FLAG_1_VTL2_REVOKE_SUB_ON_RESET_EQE
    | DRIVER_CAP_FLAG_1_VTL2_SELECTIVE_REVOKE_SUB_ON_RESET_EQE
)
DRV_MANA_PROTO_MAJOR = 1
DRV_MANA_PROTO_MINOR = 0
DRV_MANA_PROTO_MICRO = 0
DRV_DISABLE_QUEUE_ALLOC_RES_ID = 1
DRV_DATA_EQ_SIZE = 4096
DRV_DATA_TX_WQ_SIZE = 16384
DRV_DATA_TX_CQ_SIZE = 16384
DRV_DATA_RX_WQ_SIZE = 32768
DRV_DATA_RX_CQ_SIZE = 16384
DRV_RX_MAX_POSTED = 512
DRV_DEFAULT_LINK_SPEED_BPS = 200_000_000_000


# Appendix L — what Linux's `mana` driver (6.1+) sends or needs beyond the reference driver
MANA_CONFIG_VPORT_RX_REQUEST_V2 = 2  # `mana_cfg_rx_steer_req_v2`: 8 more body bytes before the table
CFG_RX_INDIR_TAB_OFFSET_V2 = 120  # 40 + 80: where the v2 table starts (message offset)
ADAPTER_MTU = 1514  # QUERY_DEV_CONFIG `adapter_mtu`: Linux's max MTU is it − 14 (the reference's 0 wraps)

def all_constants() -> dict[str, int]:
    """Every public int named in this module (enum members included), for `vfkeep layout`."""
    return {
        name: int(value)
        for name, value in globals().items()
        if name.isupper() and isinstance(value, int) and not isinstance(value, bool)
    }


@functools.lru_cache(maxsize=512)
def request_name(code: int, smc: bool = False) -> str:
    """Spec name of an HWC request code (GDMA, then MANA) or, with `smc`, of an SMC message type: what the
    device's command log, the driver's errors and the logs call it; UNKNOWN_0x.. for a code without one.
    Cached: driver and device name every request they handle."""
    for enum_cls in (SmcMsgType,) if smc else (GdmaRequestType, ManaCommandCode):
        try:
            return enum_cls(code).name
        except ValueError:
            continue
    return f"UNKNOWN_{code:#x}"


__all__ = [
    *all_constants(),
    "all_constants",
    "request_name",
    "SmcMsgType",
    "GdmaQueueType",
    "OobSizeCode",
    "GdmaEqeType",
    "HwcReconfigDataType",
    "HwcInitDataType",
    "GdmaRequestType",
    "GdmaDevType",
    "ManaCommandCode",
    "Tristate",
    "StatisticsFlags",
    "CqeType",
]
