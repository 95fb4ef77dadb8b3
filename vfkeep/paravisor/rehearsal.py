"""A prelaunched worker's rehearsal of the kept-vport restore (issue 10).

A next worker restores once in its life, cold. Before it says hello it runs the whole data-path keepalive path once
against its own things: a MANA emulator served on a thread of this process over a temporary vfio-user socket, with
scratch guest memory (its own memfd, pool and guest rings): a fresh init, a data-path keepalive save, the restore of
that state (attach sent ahead, DMA manager, device, validation), the relay started and the deferred probe; then all
of it torn down. Nothing the worker owns is touched (the real device, pool and guest memory); logging is off while
it runs. Measured (README, "Eleventh round"): go -> relay running 4.90 -> 4.25 ms pooled over 7 traced pairs.
"""
from __future__ import annotations

import gc
import logging
import os
import select
import tempfile
import threading
import time

from vfkeep.contract import NicConfig
from vfkeep.device.server import ManaVfioDevice
from vfkeep.guest.ring import ChannelLayout, NicChannel
from vfkeep.memory import DmaManager, GuestMemory, MemoryLayout
from vfkeep.proto import underhill_pb2
from vfkeep.vfio_user.server import VfioUserServer

from .device_kind import PreviousState
from .mana_kind import ManaKind
from .options import KeepAliveConfig
from .servicing import begin_servicing_state, decode_servicing_state, finish_servicing_state, reference_time

#: The scratch NIC's guest rings and memory (its worker RAM and pool sized as the host sizes one NIC's).
CHANNELS = ChannelLayout(nics=1)
LAYOUT = MemoryLayout(guest_pages=CHANNELS.total_pages, worker_pages=1024 + 768, pool_pages=512)
#: Each wait of the rehearsal (the device's answers, the relay's resume) at most.
WAIT_S = 2.0


class RehearsalFailed(RuntimeError):
    pass


def rehearse_kept_restore() -> None:
    """Run the kept-vport servicing once on scratch things and tear them down; `RehearsalFailed` (or what the code
    raised) when a step did not go as a servicing's would. Logging is disabled meanwhile (none of its lines are the
    worker's): the caller logs a failure."""
    logging.disable(logging.CRITICAL)
    try:
        with tempfile.TemporaryDirectory(prefix="vfkeep-rehearsal-") as tmp, GuestMemory.create(LAYOUT) as mem:
            sock = os.path.join(tmp, "nic.sock")
            server = VfioUserServer(sock, ManaVfioDevice("none", name="rehearsal"), control_path=sock + ".ctl")
            thread = threading.Thread(target=server.run, name="rehearsal-device", daemon=True)
            thread.start()
            try:
                rings = NicChannel.create(mem, CHANNELS, 0)
                try:
                    _servicing(sock, mem, rings)
                finally:
                    rings.close()
            finally:
                server.stop()
                thread.join(WAIT_S)
                server.device.close()
                server.close()
                server.loop.close()
                gc.collect()  # (the generations' views into the scratch memory, in cycles: its mapping goes with them)
            if thread.is_alive():
                raise RehearsalFailed("the rehearsal's device thread did not end")
    finally:
        logging.disable(logging.NOTSET)


def generation(sock: str, mem: GuestMemory, rings: NicChannel, channels: ChannelLayout = CHANNELS) -> ManaKind:
    """A worker generation's networking for one NIC with data-path keepalive, prepared as a prelaunched worker
    prepares it (guest rings attached, relay thread started); its own doorbell fds (closed with its rings). Also
    `benchmarks.bench_sensitivity`'s, which times these steps against a device process."""
    tx, rx = (os.dup(fd) for fd in rings.bell_fds())
    kind = ManaKind([NicConfig(0, "rehearsal", sock, tx, rx)], mem, channels.to_str(), datapath_keepalive=True)
    kind.prepare()
    return kind


def resume(kind: ManaKind, path: str, channels: ChannelLayout = CHANNELS):
    """Start the NIC's relay (as `ManaKind.start`) and wait until it has resumed; the NIC's VF manager, checked to
    have come up on `path`."""
    (vf,) = kind.vf_managers
    vf.start_traffic(channels.to_str())
    if vf.restore_path != path or not vf.wait_resumed(time.monotonic() + WAIT_S):
        raise RehearsalFailed(f"the scratch NIC did not come up on the {path} path: {vf.restore_report()}")
    return vf


def settle(kind: ManaKind) -> None:
    """Wait until the device has answered every attach sent ahead (`ManaKind.settle_ahead`), as a next worker does
    while the host scrubs."""
    deadline = time.monotonic() + WAIT_S
    while waiting := kind.settle_ahead():
        if time.monotonic() > deadline:
            raise RehearsalFailed("the device did not answer the attach sent ahead")
        select.select(waiting, [], [], 0.1)


def _servicing(sock: str, mem: GuestMemory, rings: NicChannel) -> None:
    enabled = KeepAliveConfig.ENABLED_HOST_AND_PRIVATE_POOL_PRESENT
    kind = generation(sock, mem, rings)
    try:
        dma = DmaManager(mem)
        kind.configure(dma)
        kind.restore(PreviousState(), enabled)
        dma.validate_restore()
        resume(kind, "fresh")
        state = underhill_pb2.ServicingState()
        begin_servicing_state(state, nics=kind.emuplat(), correlation_id=None, vm_stop_reference_time=reference_time())
        kind.stop()
        dma_state = dma.save()
        kind.save(True, state)
        finish_servicing_state(state, dma_state=dma_state, flush_logs_us=0)
        decoded = decode_servicing_state(state.SerializeToString(), downlevel=False)
    finally:
        _close(kind)
    kind = generation(sock, mem, rings)
    try:
        dma = DmaManager(mem)
        kind.attach_ahead(decoded, enabled)
        dma.prepare_restore(decoded.init_state.dma_manager_state)
        settle(kind)
        dma.restore(decoded.init_state.dma_manager_state)
        kind.configure(dma)
        kind.restore(PreviousState(decoded), enabled)
        dma.validate_restore()
        resume(kind, "keepalive")
        for vf in kind.vf_managers:  # (as `ManaKind.start`: the deferred probe, which the shutdown needs)
            vf.run()
    finally:
        kind.shutdown()
        _close(kind)


def _close(kind: ManaKind) -> None:
    """What a generation holds open after its save or shutdown (or a step that failed): an attach sent ahead that
    no restore took, a relay thread no relay took, its guest rings (their doorbell fds: dups)."""
    for pending in kind.ahead.values():
        pending.cancel()
    for thread in kind.relay_threads.values():
        thread.cancel()
    for channel in {id(c): c for c in [*kind.channels.values(), *(vf.channel for vf in kind.vf_managers)]
                    if c is not None}.values():
        channel.close()
