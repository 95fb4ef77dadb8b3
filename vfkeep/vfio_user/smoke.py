"""`vfkeep smoke`: a keepalive handover end to end on the test device, three processes.

host (this process) owns guest memory and the device process; driver 1 maps memory, fills a
persistent pool buffer, programs a register and exits without a reset; the device raises an
interrupt while nobody is attached; driver 2 (a new process) restores the DMA manager, finds
the buffer by PFN, sees the register value kept and gets the latched interrupt exactly once.
"""
from __future__ import annotations

import base64
import json
import os
import pathlib
import select
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

import click

from vfkeep import log as vlog
from vfkeep.memory import DmaManager, GuestMemory, MemoryLayout
from vfkeep.proc import end, signals_interrupt, spawn

from .client import VfioDevice
from .control import control_call
from .testdev import (DMA_CMD_CRC32, REG_DMA_ADDR, REG_DMA_CMD, REG_DMA_LEN, REG_DMA_RESULT, REG_DMA_STATUS,
                      REG_DOORBELL, REG_SCRATCH, start_testdev)

LAYOUT = MemoryLayout(guest_pages=16, worker_pages=16, pool_pages=16)
DEVICE_NAME = "nic_smoke"
SCRATCH_VALUE = 0x5EED1234
VECTOR = 1
CHILD_TIMEOUT_S = 30.0


def _say(who: str, text: str) -> None:
    click.echo(f"[{who:>8}] {text}")
    sys.stdout.flush()


def _pattern(n: int) -> bytes:
    """Recognisable, position-dependent bytes: a shifted copy would not match."""
    return bytes((i * 7 + (i >> 8) * 13) & 0xFF for i in range(n))


def _device_crc(dev: VfioDevice, gpa: int, length: int) -> int:
    """Have the device read the buffer through its DMA mapping."""
    dev.write64(REG_DMA_ADDR, gpa)
    dev.write32(REG_DMA_LEN, length)
    dev.write32(REG_DMA_CMD, DMA_CMD_CRC32)
    if dev.read32(REG_DMA_STATUS) != 0:
        raise click.ClickException(f"device reported a DMA fault reading gpa {gpa:#x}")
    return dev.read32(REG_DMA_RESULT)


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


@click.command("smoke")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=pathlib.Path), default=None,
              help="where sockets, logs and the saved state go (default: a new temporary directory)")
def smoke_command(run_dir: pathlib.Path | None) -> None:
    """Keepalive handover on the vfio-user test device: state, pool buffer and a latched interrupt survive.
    A temporary run dir is removed when the scenario passes, kept (and named) when it does not."""
    temporary = run_dir is None
    run_dir = run_dir or pathlib.Path(tempfile.mkdtemp(prefix="vfkeep-smoke-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    signals_interrupt()
    try:
        _scenario(run_dir)
    except KeyboardInterrupt as e:
        if temporary:
            shutil.rmtree(run_dir, ignore_errors=True)
        e.note = f"every process ended, run directory {run_dir} {'removed' if temporary else 'kept'}"
        raise
    if temporary:
        shutil.rmtree(run_dir, ignore_errors=True)
        _say("smoke", f"removed the run directory {run_dir}")


def _scenario(run_dir: pathlib.Path) -> None:
    """The handover itself; a failed check raises (the run dir is kept, named)."""
    vlog.setup("smoke", run_dir)
    sock = run_dir / "testdev.sock"
    state_file, result_file = run_dir / "saved-state.json", run_dir / "driver2-result.json"
    _say("host", f"run directory {run_dir}")
    mem = GuestMemory.create(LAYOUT)
    _say("host", f"guest memory memfd: {LAYOUT.to_str()} ({LAYOUT.size // 1024} KiB)")
    device = start_testdev(sock, reset_method="none", run_dir=run_dir)
    try:
        _say("host", f"test device pid {device.pid} serving {sock.name}, reset_method=none")
        _run_driver(mem, "driver1", sock, state_file, run_dir)
        saved = json.loads(state_file.read_text())

        _wait_detached(sock)
        st = control_call(f"{sock}.ctl", "state")
        _say("device", f"client gone: dma maps dropped ({st['dma_maps']} left), scratch={st['scratch']:#x} kept, "
                       f"resets={st['resets']}")
        raised = control_call(f"{sock}.ctl", "raise_irq", vector=VECTOR)
        st = control_call(f"{sock}.ctl", "state")
        _say("device", f"raised MSI-X vector {VECTOR} with no client: delivered={raised['delivered']}, "
                       f"latched={st['pending']}")
        mem.scrub_worker_ram()
        _say("host", "scrubbed worker RAM with poison (servicing); pool untouched")

        _run_driver(mem, "driver2", sock, state_file, run_dir, result_file)
        result = json.loads(result_file.read_text())
        st = control_call(f"{sock}.ctl", "state")
    finally:
        end(device)
        mem.close()
    checks = {
        "buffer found at the saved PFN": result["buffer_pfn"] == saved["buffer_pfn"],
        "buffer contents intact (driver CRC)": result["cpu_crc"] == saved["crc32"],
        "buffer contents intact (device DMA CRC)": result["device_crc"] == saved["crc32"],
        "device was not reset": not result["was_reset"] and st["resets"] == 0,
        "register value kept": result["scratch"] == SCRATCH_VALUE,
        "latched interrupt delivered once": result["irq_count"] == 1 and not result["irq_again"],
        "no pool allocation left unclaimed": result["unclaimed"] == 0,
    }
    for name, ok in checks.items():
        _say("smoke", f"{'PASS' if ok else 'FAIL'}  {name}")
    if not all(checks.values()):
        raise click.ClickException(f"smoke scenario failed (logs kept in {run_dir})")
    _say("smoke", "keepalive handover OK")


def _run_driver(mem: GuestMemory, role: str, sock: pathlib.Path, state_file: pathlib.Path, run_dir: pathlib.Path,
                result_file: pathlib.Path | None = None) -> None:
    argv = [sys.executable, "-m", "vfkeep.vfio_user.smoke", role, "--socket", str(sock), "--memfd", str(mem.fd),
            "--layout", LAYOUT.to_str(), "--state", str(state_file), "--run-dir", str(run_dir)]
    if result_file is not None:
        argv += ["--result", str(result_file)]
    proc = spawn(argv, pass_fds=[mem.fd])
    try:
        code = proc.wait(CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        end(proc)
        raise click.ClickException(f"{role} did not finish within {CHILD_TIMEOUT_S} s") from None
    except KeyboardInterrupt:
        end(proc)
        raise
    if code != 0:
        raise click.ClickException(f"{role} exited with status {code}")


def _wait_detached(sock: pathlib.Path, timeout: float = 10.0) -> None:
    """The driver process has exited; wait until the device has processed the disconnect."""
    deadline = time.monotonic() + timeout
    while control_call(f"{sock}.ctl", "epoch")["connected"]:
        if time.monotonic() > deadline:
            raise click.ClickException("device still reports a client after the driver exited")
        time.sleep(0.01)


# -- driver processes (python -m vfkeep.vfio_user.smoke driver1|driver2 ...) --------------------
_driver_options = [
    click.option("--socket", "socket_path", required=True),
    click.option("--memfd", type=int, required=True),
    click.option("--layout", required=True),
    click.option("--state", "state_file", required=True, type=click.Path(path_type=pathlib.Path)),
    click.option("--run-dir", required=True),
]


def _with_driver_options(fn):
    for opt in reversed(_driver_options):
        fn = opt(fn)
    return fn


@click.group()
def _drivers() -> None:
    """Driver roles of the smoke scenario (run by `vfkeep smoke`)."""


@_drivers.command("driver1")
@_with_driver_options
def _driver1(socket_path: str, memfd: int, layout: str, state_file: pathlib.Path, run_dir: str) -> None:
    vlog.setup("driver1", run_dir)
    mem = GuestMemory.attach(memfd, MemoryLayout.from_str(layout))
    manager = DmaManager(mem)
    block = manager.new_client(DEVICE_NAME, persistent=True).allocate_dma_buffer(4096)
    pattern = _pattern(block.len)
    block.view[:] = pattern
    crc = zlib.crc32(pattern)
    _say("driver1", f"persistent buffer at pfn {block.base_pfn} ({block.pages} page) filled, crc32={crc:#010x}")
    with VfioDevice.new(socket_path) as dev:
        _say("driver1", f"attached (new): RESET flag {'set' if dev.info.can_reset else 'clear'}, "
                        f"reset sent: {dev.was_reset}")
        dev.map_guest_memory(mem)
        device_crc = _device_crc(dev, block.gpa, block.len)
        _say("driver1", f"mapped guest memory; device DMA read of the buffer gives crc32={device_crc:#010x}")
        dev.write32(REG_SCRATCH, SCRATCH_VALUE)
        efd = dev.set_irq(VECTOR)
        dev.write32(REG_DOORBELL, VECTOR, posted=True)
        dev.read32(REG_SCRATCH)  # flush: the posted doorbell has been handled
        _say("driver1", f"SCRATCH={SCRATCH_VALUE:#x}; doorbell -> vector {VECTOR} eventfd count "
                        f"{os.eventfd_read(efd) if _readable(efd) else 0}")
        blob = manager.save().SerializeToString()
        state_file.write_text(json.dumps({"dma_state": base64.b64encode(blob).decode(), "buffer_pfn": block.base_pfn,
                                          "crc32": crc, "device_crc": device_crc}))
        _say("driver1", f"saved DMA manager state ({len(blob)} bytes); exiting without reset")


@_drivers.command("driver2")
@_with_driver_options
@click.option("--result", "result_file", required=True, type=click.Path(path_type=pathlib.Path))
def _driver2(socket_path: str, memfd: int, layout: str, state_file: pathlib.Path, run_dir: str,
             result_file: pathlib.Path) -> None:
    vlog.setup("driver2", run_dir)
    saved = json.loads(state_file.read_text())
    mem = GuestMemory.attach(memfd, MemoryLayout.from_str(layout))
    manager = DmaManager(mem)
    manager.restore(base64.b64decode(saved["dma_state"]))
    blocks = manager.new_client(DEVICE_NAME, persistent=True).attach_pending_buffers()
    block = next(b for b in blocks if b.base_pfn == saved["buffer_pfn"])
    unclaimed = manager.validate_restore()
    cpu_crc = zlib.crc32(block.view)
    _say("driver2", f"restored DMA manager; attached {len(blocks)} buffer(s), pfn {block.base_pfn} "
                    f"crc32={cpu_crc:#010x}")
    with VfioDevice.restore(socket_path) as dev:
        _say("driver2", f"attached (restore): RESET flag {'set' if dev.info.can_reset else 'clear'}, no reset sent")
        dev.map_guest_memory(mem)
        scratch = dev.read32(REG_SCRATCH)
        _say("driver2", f"SCRATCH reads {scratch:#x}")
        efd = dev.set_irq(VECTOR)  # the server signals the latch before it replies
        irq_count = os.eventfd_read(efd) if _readable(efd) else 0
        dev.read32(REG_SCRATCH)  # round trip: anything else the device had queued is now in the eventfd
        irq_again = _readable(efd)
        _say("driver2", f"assigned vector {VECTOR}: eventfd count {irq_count}, another one pending: {irq_again}")
        device_crc = _device_crc(dev, block.gpa, block.len)
        _say("driver2", f"device DMA read of the restored buffer gives crc32={device_crc:#010x}")
        result_file.write_text(json.dumps({
            "buffer_pfn": block.base_pfn, "cpu_crc": cpu_crc, "device_crc": device_crc, "scratch": scratch,
            "irq_count": irq_count, "irq_again": irq_again, "was_reset": dev.was_reset,
            "unclaimed": len(unclaimed)}))
    block.free()


if __name__ == "__main__":
    _drivers()
