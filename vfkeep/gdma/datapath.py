"""MANA data path (§12): TX OOBs, TX/RX completion OOBs (the 60-byte `Cqe.data`), one-SGE WQE shapes."""
from __future__ import annotations

from .base import BitfieldWord, WireStruct, bits, u8, u16, u32, u64
from .queues import Sge, WqeHeader


class ManaTxShortOob(BitfieldWord):
    """§12.1: 8-byte TX OOB (code 2) when `tx_vport_offset` ≤ 0xFF and no VLAN insertion; `pkt_fmt` 0."""

    _fields_ = bits(
        u64,
        ("pkt_fmt", 2),
        ("is_outer_ipv4", 1),
        ("is_outer_ipv6", 1),
        ("comp_iphdr_csum", 1),
        ("comp_tcp_csum", 1),
        ("comp_udp_csum", 1),
        ("suppress_txcqe_gen", 1),
        ("vcq_num", 24),
        ("trans_off", 10),
        ("vsq_frame", 14),
        ("short_vp_offset", 8),
    )


class ManaTxLongOob(BitfieldWord):
    """§12.1: second half of the long form; `long_vp_offset` carries `tx_vport_offset`."""

    _fields_ = bits(
        u64,
        ("is_encap", 1),
        ("inner_is_ipv6", 1),
        ("inner_tcp_opt", 1),
        ("inject_vlan_pri_tag", 1),
        ("reserved1", 12),
        ("pcp", 3),
        ("dei", 1),
        ("vlan_id", 12),
        ("inner_frame_offset", 10),
        ("inner_ip_rel_offset", 6),
        ("long_vp_offset", 12),
        ("reserved2", 4),
    )


class ManaTxOob(WireStruct):
    """§12.1: 24-byte long-form TX OOB (code 6); `s_oob.pkt_fmt` = 1."""

    _fields_ = [("s_oob", ManaTxShortOob), ("l_oob", ManaTxLongOob), ("reserved3", u32), ("reserved4", u32)]


class ManaCqeHeader(BitfieldWord):
    """§12.2: first dword of both completion OOBs; `cqe_type` is a `CqeType`, `client_type` 1."""

    _fields_ = bits(u32, ("cqe_type", 6), ("client_type", 2), ("vendor_err", 24))


class ManaTxCompOobOffsets(BitfieldWord):
    _fields_ = bits(u32, ("tx_sgl_offset", 5), ("tx_wqe_offset", 27))


class ManaTxCompOob(WireStruct):
    """§12.2: `Cqe.data` of a TX completion (60 bytes)."""

    _fields_ = [
        ("cqe_hdr", ManaCqeHeader),
        ("tx_data_offset", u32),
        ("offsets", ManaTxCompOobOffsets),
        ("reserved", u32 * 12),
    ]


class ManaRxcompOobFlags(BitfieldWord):
    _fields_ = bits(
        u32,
        ("rx_vlan_id", 12),
        ("rx_vlantag_present", 1),
        ("rx_outer_iphdr_csum_succeed", 1),
        ("rx_outer_iphdr_csum_fail", 1),
        ("reserved1", 1),
        ("rx_hashtype", 9),
        ("rx_iphdr_csum_succeed", 1),
        ("rx_iphdr_csum_fail", 1),
        ("rx_tcp_csum_succeed", 1),
        ("rx_tcp_csum_fail", 1),
        ("rx_udp_csum_succeed", 1),
        ("rx_udp_csum_fail", 1),
        ("reserved2", 1),
    )


class ManaRxcompPerpktInfo(WireStruct):
    """§12.4: `pkt_len` is the full packet length even when truncated."""

    _fields_ = [("pkt_len", u16), ("reserved1", u16), ("reserved2", u32), ("pkt_hash", u32)]


class ManaRxcompOob(WireStruct):
    """§12.4: `Cqe.data` of an RX completion (60 bytes); only `ppi[0]` is used."""

    _fields_ = [
        ("cqe_hdr", ManaCqeHeader),
        ("flags", ManaRxcompOobFlags),
        ("ppi", ManaRxcompPerpktInfo * 4),
        ("rx_wqe_offset", u32),
    ]


class ManaTxWqeShortOneSge(WireStruct):
    """Appendix A: smallest TX WQE, short OOB + one SGE (32 bytes)."""

    _fields_ = [("header", WqeHeader), ("oob", ManaTxShortOob), ("sge", Sge)]


class ManaTxWqeLongOneSge(WireStruct):
    """Appendix A: long OOB + one SGE (64 bytes); `padding` (not named by the spec) fills it to 64."""

    _fields_ = [("header", WqeHeader), ("oob", ManaTxOob), ("sge", Sge), ("padding", u8 * 16)]


class ManaRxWqeOneSge(WireStruct):
    """Appendix A: RX WQE with one SGE (32 bytes, same shape as `HwcRecvWqe`)."""

    _fields_ = [("header", WqeHeader), ("oob_unused", u8 * 8), ("sge", Sge)]


__all__ = [
    "ManaTxShortOob", "ManaTxLongOob", "ManaTxOob", "ManaCqeHeader", "ManaTxCompOobOffsets", "ManaTxCompOob",
    "ManaRxcompOobFlags", "ManaRxcompPerpktInfo", "ManaRxcompOob", "ManaTxWqeShortOneSge",
    "ManaTxWqeLongOneSge", "ManaRxWqeOneSge",
]
