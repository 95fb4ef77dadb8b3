"""A relay's thread is started before the saved state arrives (`ManaKind.prepare`, `RelayThread`): a restore hands
it the relay instead of starting a thread inside the guest's blackout (issue 10, session 7).

The relay runs over a real driver and the in-process emulator (loopback backend), as in test_relay_drops."""
from __future__ import annotations

import os
import threading

from driver_helpers import numbered_frames
from test_relay_drops import LAYOUT, relay_bench  # noqa: F401 (the fixture and the memory it needs)
from vfkeep.contract import NicConfig
from vfkeep.paravisor.net_relay import RelayThread
from vfkeep.paravisor.vf_manager import VfManager


def test_a_relay_runs_on_the_thread_started_before_it(relay_bench):
    """`RelayThread` (started by `ManaKind.prepare`, before the saved state arrives): the relay's loop runs on it,
    no thread is started in the restore's window, and `stop()` still waits for the loop to end."""
    relay, channel, _ = relay_bench(slots=16)
    ahead = RelayThread("relay-nic0")
    before = threading.active_count()
    assert channel.tx.push_many(numbered_frames(8)) == 8
    relay.start(ahead)
    assert relay.resumed.wait(5) and threading.active_count() == before
    assert relay._thread is ahead.thread and len(channel.rx) > 0
    relay.stop()
    assert not ahead.thread.is_alive()


def test_a_relay_thread_no_relay_took_ends():
    """A NIC that got no relay (its device did not come up) ends the thread prepared for it."""
    vf = VfManager(NicConfig(0, "nic0", "unused.sock", -1, -1), None, None)
    vf.relay_thread = ahead = RelayThread("relay-nic0")
    vf.start_relay()  # no vport
    ahead.thread.join(5)
    assert not ahead.thread.is_alive() and vf.relay_thread is None and vf.relay is None


def test_the_mana_kind_prepares_a_relay_thread_per_nic_and_ends_one_no_relay_took(tmp_path, monkeypatch):
    """`ManaKind.prepare` starts each NIC's relay thread before the state arrives; a NIC whose device does not
    come up takes none, and its thread ends once the kind starts."""
    from vfkeep.driver.errors import DeviceMissing
    from vfkeep.memory import DmaManager, GuestMemory, MemoryLayout
    from vfkeep.paravisor.device_kind import PreviousState
    from vfkeep.paravisor.mana_kind import ManaKind
    from vfkeep.paravisor.options import KeepAliveConfig

    def absent(self, *args, **kwargs):
        raise DeviceMissing("no device")

    monkeypatch.setattr(VfManager, "_fresh", absent)
    mem = GuestMemory.create(MemoryLayout(guest_pages=64, worker_pages=16, pool_pages=16))
    bells = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
    kind = ManaKind([NicConfig(0, "nic0", str(tmp_path / "absent.sock"), *bells)], mem,
                    "nics=1,slots=16,slot_size=2048,base=0")
    try:
        kind.prepare()
        ahead = kind.relay_threads[0]
        assert ahead.thread.is_alive() and ahead.thread.name == "relay-nic0"
        kind.configure(DmaManager(mem))
        kind.restore(PreviousState(None, None), KeepAliveConfig.DISABLED)
        (vf,) = kind.vf_managers
        assert vf.dev is None and vf.relay_thread is ahead and kind.relay_threads == {}
        kind.start()
        ahead.thread.join(5)
        assert not ahead.thread.is_alive()
    finally:
        kind.shutdown()
        for fd in bells:
            os.close(fd)
        mem.close()


def test_the_stop_drains_on_the_stopping_thread_once_the_relay_thread_has_ended(relay_bench, monkeypatch):
    """The drain's last frames to the guest are where a servicing's blackout starts: it runs after the relay's
    thread has ended and the stopping thread woke from the join (0.05-0.45 ms under load), on that thread, not
    before them on the relay's."""
    relay, channel, _ = relay_bench(slots=16)
    backing = relay.datapath.gdma.backing
    reads = []
    read32 = backing.read32
    monkeypatch.setattr(backing, "read32", lambda offset: (
        reads.append((threading.current_thread(), relay._thread.is_alive())), read32(offset))[1])
    assert channel.tx.push_many(numbered_frames(8)) == 8
    relay.start()
    assert relay.resumed.wait(5)
    relay.stop()
    assert reads == [(threading.current_thread(), False)]  # the drain's register read
    assert len(channel.rx) == 8


def test_the_mana_kind_makes_the_rings_block_views_before_the_state_arrives():
    """The relay's first passes copy the guest's frames as blocks of ring slots; the view of the slots as one array
    (`Ring._rows`, made on first use) is made by `ManaKind.prepare`, with the ring attach, not in those passes."""
    from vfkeep.guest.ring import ChannelLayout, NicChannel
    from vfkeep.memory import GuestMemory, MemoryLayout
    from vfkeep.paravisor.mana_kind import ManaKind

    mem = GuestMemory.create(MemoryLayout(guest_pages=64, worker_pages=16, pool_pages=16))
    layout = "nics=1,slots=16,slot_size=2048,base=0"
    host_side = NicChannel.create(mem, ChannelLayout.from_str(layout), 0)
    kind = ManaKind([NicConfig(0, "nic0", "unused.sock", *host_side.bell_fds())], mem, layout)
    try:
        kind.prepare()
        channel = kind.channels[0]
        assert channel.tx._slot_rows is not None and channel.rx._slot_rows is not None
    finally:
        for ahead in kind.relay_threads.values():
            ahead.cancel()
            ahead.thread.join(5)
        for channel in kind.channels.values():
            channel.tx.close()
            channel.rx.close()
        host_side.close()
        mem.close()
