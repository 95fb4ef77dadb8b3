"""A MANA vport and its data path (spec gdma.md §11, §12): TX WQEs → frames, frames → RX WQE buffers.

Per vport: at most one SQ and one RQ, each with its CQ (CREATE_WQ_OBJ), and a
`running` flag set by CONFIG_VPORT_RX (`rx_enable`). Work happens in batches:
an SQ doorbell processes every pending send WQE (completions in posting
order, then the frames go to the backend); an RQ doorbell fetches up to 256
receive WQEs into the device (`EMU_MAX_RX_OUTSTANDING`), and each frame from
the backend fills the oldest one.

TX: the frame is the SGE buffers concatenated (one copy); a long-form OOB
with `inject_vlan_pri_tag` gets an 802.1Q tag inserted after the MAC
addresses; LSO WQEs are sent as one frame (no segmentation). Checksum
offload flags are not acted on. Completion types: CQE_TX_OKAY;
CQE_TX_GDMA_ERR for a malformed WQE, an LSO WQE breaking §12.1's rules or a
buffer outside the DMA-mapped ranges; CQE_TX_MTU_DROP for a frame above
`MAX_FRAME` bytes.

RX: bytes are written across the WQE's SGEs; CQE_RX_TRUNCATED when they do
not fit (`pkt_len` is still the full length). A receive WQE that is
malformed or whose buffer is outside the mapped ranges is completed with
`cqe_type` CQE_INVALID and `vendor_err` `VENDOR_ERR_MALFORMED_WQE` /
`VENDOR_ERR_DMA_FAULT` (the reference driver counts any non-OK type as an RX
error and recycles the buffer). A frame is dropped (never an exception) when:
the vport is not running (`in_errors_rx_vport_disabled`), its link is down
(`rx_dropped_link_down`), no receive WQE is posted (`in_discards_no_wqe`) or
the completion queue cannot be reached because no driver has memory mapped
(`rx_dropped_unmapped`; the WQE stays posted for later frames), or it is
empty (`rx_errors`: Linux's driver would not consume the WQE of a zero-length
completion).

FENCE_RQ (Linux only, gdma.md Appendix L.1): `fence_rq()` posts one
CQE_RX_OBJECT_FENCE on the RX CQ without taking a receive WQE.
"""
from __future__ import annotations

import collections
import ctypes

from vfkeep.gdma.constants import (
    CQE_INVALID,
    CQE_RX_OBJECT_FENCE,
    CQE_RX_OKAY,
    CQE_RX_TRUNCATED,
    CQE_TX_GDMA_ERR,
    CQE_TX_MTU_DROP,
    CQE_TX_OKAY,
    EMU_LSO_MAX_HEADER_SGE,
    EMU_MAX_RX_OUTSTANDING,
    GDMA_SQ,
    MANA_CQE_COMPLETION,
    MANA_LONG_PKT_FMT,
)
from vfkeep.gdma.datapath import ManaRxcompOob, ManaTxCompOob, ManaTxOob
from vfkeep.vfio_user.dma import DmaFault

from .queues import VENDOR_ERR_DMA_FAULT, VENDOR_ERR_MALFORMED_WQE, Cq, Wq, WqeRef

MAX_FRAME = 0xFFFF  # `pkt_len` is a u16
_TPID_8021Q = b"\x81\x00"
_TX_OOB_LONG = ctypes.sizeof(ManaTxOob)


def _tx_completion(cqe_type: int) -> bytes:
    oob = ManaTxCompOob()
    oob.cqe_hdr.cqe_type = cqe_type
    oob.cqe_hdr.client_type = MANA_CQE_COMPLETION
    return oob.to_bytes()


_TX_COMPLETIONS = {t: _tx_completion(t) for t in (CQE_TX_OKAY, CQE_TX_GDMA_ERR, CQE_TX_MTU_DROP)}


def rx_completion(cqe_type: int, pkt_len: int, wqe_offset: int, vendor_err: int = 0) -> bytes:
    oob = ManaRxcompOob()
    oob.cqe_hdr.cqe_type = cqe_type
    oob.cqe_hdr.client_type = MANA_CQE_COMPLETION
    oob.cqe_hdr.vendor_err = vendor_err
    oob.ppi[0].pkt_len = min(pkt_len, MAX_FRAME)
    oob.rx_wqe_offset = wqe_offset
    return oob.to_bytes()


_FENCE_COMPLETION = rx_completion(CQE_RX_OBJECT_FENCE, 0, 0)


def vlan_tag(pcp: int, dei: int, vlan_id: int) -> bytes:
    return _TPID_8021Q + (pcp << 13 | dei << 12 | vlan_id).to_bytes(2, "big")


class Vport:
    """One vport: MAC, queues, steering settings and the data path."""

    def __init__(self, dev, index: int, mac: bytes):
        self.dev, self.index, self.mac = dev, index, mac
        self.link_up = True
        self.reset()

    def reset(self) -> None:
        """Power-on state (FLR); link state is the wire's, not the function's, and survives."""
        self.tx_config: dict | None = None
        self.sq: Wq | None = None
        self.tx_cq: Cq | None = None
        self.rq: Wq | None = None
        self.rx_cq: Cq | None = None
        self.running = False
        self.posted: collections.deque[WqeRef] = collections.deque()
        self.serial_no: int | None = None
        self.direction_to_vtl0 = 0
        self.rss_enable = False
        self.default_rxobj: int | None = None
        self.hashkey = bytes(40)
        self.indir_table: list[int] = []

    # -- queues ------------------------------------------------------------------------------
    def attach(self, wq_type: int, wq: Wq, cq: Cq) -> None:
        if wq_type == GDMA_SQ:
            self.sq, self.tx_cq = wq, cq
            wq.on_doorbell = self.sq_doorbell
        else:
            self.rq, self.rx_cq = wq, cq
            wq.on_doorbell = self.fetch_rx

    def queues(self, wq_type: int) -> tuple[Wq | None, Cq | None]:
        return (self.sq, self.tx_cq) if wq_type == GDMA_SQ else (self.rq, self.rx_cq)

    def detach(self, wq_type: int) -> None:
        if wq_type == GDMA_SQ:
            self.sq = self.tx_cq = None
        else:
            self.rq = self.rx_cq = None
            self.posted.clear()

    def start(self) -> None:
        self.running = True
        self.fetch_rx()
        self.sq_doorbell()

    def stop(self) -> None:
        self.running = False

    # -- TX ----------------------------------------------------------------------------------
    def sq_doorbell(self) -> None:
        if not self.running or self.sq is None:
            return
        dev, sq, cq = self.dev, self.sq, self.tx_cq
        counters = dev.counters
        frames = []
        while sq.pending:
            try:
                wqe = sq.take()
            except DmaFault:
                dev.dma_fault("SQ", sq.id)
                break
            result = self._tx_frame(wqe)
            if isinstance(result, int):
                cqe_type = result
                counters["tx_errors"] += 1
            else:
                cqe_type = CQE_TX_OKAY
                frames.append(result)
            try:
                cq.post(_TX_COMPLETIONS[cqe_type], sq.id, True)
            except DmaFault:
                dev.dma_fault("CQ", cq.id)
        for frame in frames:
            dev.transmit(self, frame)

    def _tx_frame(self, wqe: WqeRef) -> bytes | int:
        """The frame of one send WQE, or the error completion type."""
        dev = self.dev
        if wqe.error:
            return CQE_TX_GDMA_ERR
        sges = wqe.sges
        params = wqe.params
        if not sges:
            dev.counters["malformed_wqes"] += 1
            return CQE_TX_GDMA_ERR
        if params.client_oob_in_sgl and (len(sges) < 2 or sges[0].size > EMU_LSO_MAX_HEADER_SGE):
            dev.counters["malformed_wqes"] += 1
            return CQE_TX_GDMA_ERR
        if sum(s.size for s in sges) > MAX_FRAME:
            dev.counters["out_errors_mtu_violation"] += 1
            return CQE_TX_MTU_DROP
        try:
            frame = dev.gather(sges)
        except DmaFault:
            dev.dma_fault("TX buffer", self.sq.id)
            return CQE_TX_GDMA_ERR
        oob = wqe.oob()
        if len(oob) >= _TX_OOB_LONG:
            long_oob = ManaTxOob.from_bytes(oob)
            l_oob = long_oob.l_oob
            if long_oob.s_oob.pkt_fmt == MANA_LONG_PKT_FMT and l_oob.inject_vlan_pri_tag:
                frame = frame[:12] + vlan_tag(l_oob.pcp, l_oob.dei, l_oob.vlan_id) + frame[12:]
        return frame

    # -- RX ----------------------------------------------------------------------------------
    def fetch_rx(self) -> None:
        """Take posted receive WQEs into the device, up to `EMU_MAX_RX_OUTSTANDING`."""
        rq, dev = self.rq, self.dev
        if rq is None or not self.running:
            return
        while rq.pending and len(self.posted) < EMU_MAX_RX_OUTSTANDING:
            try:
                self.posted.append(rq.take())
            except DmaFault:
                dev.dma_fault("RQ", rq.id)
                return

    def _complete_rx(self, data: bytes) -> bool:
        """Post an RX completion for the oldest posted WQE and retire it; False if the CQ is unreachable."""
        try:
            self.rx_cq.post(data, self.rq.id, False)
        except DmaFault:
            return False
        self.posted.popleft()
        return True

    def fence_rq(self) -> None:
        """FENCE_RQ (gdma.md Appendix L.1): one CQE_RX_OBJECT_FENCE on the RX CQ, with the usual
        notification, consuming no receive WQE. Frames are completed as they arrive, so every packet
        already taken from the RQ has its CQE before the fence. `DmaFault`: nothing was posted."""
        self.rx_cq.post(_FENCE_COMPLETION, self.rq.id, False)

    def receive(self, frame: bytes) -> None:
        dev = self.dev
        counters = dev.counters
        if not frame:  # Linux takes CQE_RX_OKAY with pkt_len 0 as an error and keeps the WQE (Appendix L.3)
            counters["rx_errors"] += 1
            return
        if not self.running:
            counters["in_errors_rx_vport_disabled"] += 1
            return
        if not self.link_up:
            counters["rx_dropped_link_down"] += 1
            return
        while True:
            if not self.posted:
                self.fetch_rx()
                if not self.posted:
                    counters["in_discards_no_wqe"] += 1
                    return
            wqe = self.posted[0]
            if not wqe.error:
                break
            if not self._complete_rx(rx_completion(CQE_INVALID, 0, wqe.position, VENDOR_ERR_MALFORMED_WQE)):
                counters["rx_dropped_unmapped"] += 1
                return
            counters["rx_errors"] += 1
        try:
            written = dev.scatter(wqe.sges, frame)
        except DmaFault:
            if self._complete_rx(rx_completion(CQE_INVALID, len(frame), wqe.position, VENDOR_ERR_DMA_FAULT)):
                dev.dma_fault("RX buffer", self.rq.id)
                counters["rx_errors"] += 1
            else:
                counters["rx_dropped_unmapped"] += 1
            return
        n = len(frame)
        truncated = written < n
        if not self._complete_rx(rx_completion(CQE_RX_TRUNCATED if truncated else CQE_RX_OKAY, n, wqe.position)):
            counters["rx_dropped_unmapped"] += 1
            return
        counters["rx_truncated"] += truncated
        dev.count_frame("in", frame)

    def describe(self) -> dict:
        def q(x):
            return x.describe() if x is not None else None

        return {"index": self.index, "mac": self.mac.hex(":"), "link_up": self.link_up, "running": self.running,
                "tx_config": self.tx_config, "sq": q(self.sq), "tx_cq": q(self.tx_cq), "rq": q(self.rq),
                "rx_cq": q(self.rx_cq), "posted_rx": len(self.posted), "serial_no": self.serial_no,
                "direction_to_vtl0": self.direction_to_vtl0, "rss_enable": self.rss_enable,
                "default_rxobj": self.default_rxobj, "indir_entries": len(self.indir_table)}


__all__ = ["Vport", "rx_completion", "vlan_tag", "MAX_FRAME", "VENDOR_ERR_MALFORMED_WQE", "VENDOR_ERR_DMA_FAULT"]
