"""Device-side submission and completion queues (spec nvme.md §3, §4).

The controller owns the SQ head and the CQ tail and phase; the driver owns
the SQ tail and CQ head, which reach the controller through doorbells. A
completion that finds its CQ full waits in `overflow` (in order) until the
driver frees an entry.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass(eq=False)
class Sq:
    qid: int
    base: int
    size: int
    cqid: int
    head: int = 0
    inflight: int = 0  # IO commands fetched and not yet completed (admin: unused)
    failed: str | None = None

    def inspect(self, tail: int) -> dict:
        return {"qid": self.qid, "base": self.base, "size": self.size, "cqid": self.cqid, "head": self.head,
                "tail": tail, "inflight": self.inflight, "failed": self.failed}


@dataclass(eq=False)
class Cq:
    qid: int
    base: int
    size: int
    iv: int
    ien: bool
    tail: int = 0
    phase: int = 1
    overflow: collections.deque = field(default_factory=collections.deque)  # (sqid, cid, status, dw0)
    failed: str | None = None

    def inspect(self, head: int) -> dict:
        return {"qid": self.qid, "base": self.base, "size": self.size, "iv": self.iv, "ien": self.ien,
                "tail": self.tail, "head": head, "phase": self.phase, "overflow": len(self.overflow),
                "failed": self.failed}
