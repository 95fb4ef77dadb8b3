"""The host<->worker contract: the servicing channel, its messages, the names both sides share, the servicing result.

The host (`vfkeep.host`) and the worker (`vfkeep.paravisor`) import only this module from each other's
side: the host process never loads driver, gdma or vfio-user code, and a worker of another version
(`--worker-cmd`) only has to speak what is written here. Standard library only (and `save_hooks`, names).

Channel: a socketpair the host creates; the worker inherits its end as `--channel-fd`. A frame is two
little-endian u32 lengths (JSON, payload), a JSON object `{"type": KIND, ...fields}` and that many raw
payload bytes: only the saved-state transfer messages carry a payload (a message's `payload` field).

    worker -> host  hello       once its imports are done
    host -> worker  start       -> started; with `servicing` the worker first fetches the saved state:
      worker -> host  restore_state_request (REQUEST_DATA)
      host -> worker  restore_state ... MORE_DATA, ending with SUCCESS (or FAILURE: aborted)
      worker -> host  restore_completed (SUCCESS | FAILURE), then started
    host -> worker  save        -> save_state ... MORE_DATA, ending with SUCCESS
                                   -> host answers save_state_answer once: SUCCESS and the worker exits
                                      without resetting kept devices, FAILURE and it handles a failed save
                                   | save_state FAILURE: it revived its NICs and keeps running (spec §2.4, D5)
    host -> worker  inspect     -> inspect
    host -> worker  shutdown    -> bye, after a normal shutdown of every NIC
    worker -> host  error       the worker cannot take that message in its state

The saved-state transfer is servicing spec §2.5 (the GET protocol): chunks of at most `MAX_CHUNK` bytes
with a status word (`TransferStatus`). Each restore_state header states its data length, which must equal
its payload (a mismatch is fatal for the worker, never a silent truncation).

Decoding checks every field's type: a message that does not fit is a `ContractError`, which the host
treats as a failed worker (DESIGN D4). Unknown fields are ignored and fields with a default may be
absent, so either side can grow a field without breaking the other.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import select
import socket
import struct
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .save_hooks import SAVE_TEST_CONFIGS  # (the hooks a save request may carry: a name both sides share)

# -- environment variables the host sets and the worker reads (servicing spec §1, DESIGN §10) -----------
MANA_KEEPALIVE_ENV = "OPENHCL_MANA_KEEP_ALIVE"
NVME_KEEPALIVE_ENV = "OPENHCL_NVME_KEEP_ALIVE"
#: "1" or "true" (any case): the NVMe fresh path uses FLR only.
NVME_ALWAYS_FLR_ENV = "OPENHCL_NVME_ALWAYS_FLR"
#: Private pool size in pages (wins over POOL_CONFIG_ENV, spec §1.2).
POOL_OVERRIDE_ENV = "OPENHCL_ENABLE_VTL2_GPA_POOL"
POOL_CONFIG_ENV = "OPENHCL_IGVM_VTL2_GPA_POOL_CONFIG"
#: "1": keep the vport data path across MANA keepalive (DESIGN D7, a vfkeep option).
DATAPATH_KEEPALIVE_ENV = "VFKEEP_DATAPATH_KEEPALIVE"
#: "1": the worker is prelaunched as a servicing's next one (seconds before the state comes): it may rehearse its
#: restore before its hello (`Worker.rehearse_restore`); a worker started inside a blackout must not.
PRELAUNCHED_ENV = "VFKEEP_PRELAUNCHED"
#: "1": unrestored pool allocations fail the restore, as in OpenHCL (DESIGN D3).
STRICT_POOL_ENV = "VFKEEP_STRICT_POOL"
#: Servicing test hooks (spec §2.4), also settable per save request.
TEST_CONFIG_ENV = "VFKEEP_TEST_CONFIG"


class RestorePath(enum.StrEnum):
    """How a NIC came up in the new worker (servicing spec §6.1, DESIGN D2)."""

    KEEPALIVE = "keepalive"  # restored from saved state: no ESTABLISH_HWC, no REGISTER_DEVICE, no FLR
    FRESH = "fresh"          # initialised from scratch (NoReset, then FLR if that fails)
    FALLBACK = "fallback"    # a keepalive restore failed or the state was unusable: FLR and fresh init


class SaveOutcome(enum.StrEnum):
    """What the old worker's save did with one NIC (servicing spec §5.2, §2.3)."""

    SAVED = "Saved"                  # device kept, handle released without reset
    SAVE_FAILED = "SaveFailed"       # driver refused: switched to FLR and released, so the device resets
    DEVICE_MISSING = "DeviceMissing"  # nothing to save (no device, or BAR0 reads all ones)
    SHUTDOWN = "Shutdown"            # no MANA keepalive: normal shutdown


class TransferStatus(enum.IntEnum):
    """Status word of the saved-state transfer messages (servicing spec §2.5; the GET protocol's values)."""

    SUCCESS = 0
    FAILURE = 1
    MORE_DATA = 2
    REQUEST_DATA = 3


#: Most payload bytes in one saved-state transfer message (spec §2.5).
MAX_CHUNK = 8192
#: Most saved-state bytes the host keeps; a larger state is answered FAILURE (the save fails, §2.4).
MAX_SERVICING_STATE = 16 << 20


class HostCapabilities(enum.IntFlag):
    """`SaveGuestVtl2StateFlags` of the save request (servicing spec §1.3): "allow" bits, absent = not allowed."""

    NVME_KEEPALIVE = 1 << 0
    MANA_KEEPALIVE = 1 << 1


#: Bits 2..63 of the capability word are reserved and must be zero.
RESERVED_CAPABILITIES = ((1 << 64) - 1) & ~int(HostCapabilities.NVME_KEEPALIVE | HostCapabilities.MANA_KEEPALIVE)
#: A timeout hint (u16 seconds) this large means "no timeout", replaced by NO_TIMEOUT_S (spec §2.1).
NO_TIMEOUT_HINT_S = 65535
NO_TIMEOUT_S = 200.0


def capability_word(*, mana_keepalive: bool, nvme_keepalive: bool) -> int:
    """The capability word for the VMM's `GuestServicingFlags` (one-to-one onto bits 0 and 1)."""
    return int((HostCapabilities.NVME_KEEPALIVE if nvme_keepalive else 0)
               | (HostCapabilities.MANA_KEEPALIVE if mana_keepalive else 0))


def timeout_hint(timeout_s: float) -> int:
    """The u16 hint for a timeout in seconds: whole seconds rounded up, NO_TIMEOUT_HINT_S for "none"."""
    return NO_TIMEOUT_HINT_S if timeout_s >= NO_TIMEOUT_HINT_S else max(1, math.ceil(timeout_s))


class ContractError(ValueError):
    """A message or record that does not fit the contract (missing field, wrong type, unknown kind)."""


# -- JSON records --------------------------------------------------------------------------------------
def _to_json(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def _converter(tp: Any) -> typing.Callable[[Any, str], Any]:
    """The function that turns a parsed JSON value into type `tp` (`conv(value, where)`), or raises ContractError
    naming `where`. Built once per field type (`_plan`): a message is decoded on a servicing's critical path, and
    inspecting each field's type anew cost about as much as the rest of the hop's Python."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return lambda value, where: value
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        conv = _converter(inner)
        return lambda value, where: None if value is None else conv(value, where)
    if origin is tuple:
        item = _converter(args[0])

        def sequence(value, where):
            if not isinstance(value, list):
                raise ContractError(f"{where}: expected a list, got {type(value).__name__}")
            return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))
        return sequence
    if origin is dict or tp is dict:
        def mapping(value, where):
            if not isinstance(value, dict):
                raise ContractError(f"{where}: expected an object, got {type(value).__name__}")
            return value
        return mapping
    if isinstance(tp, type) and issubclass(tp, Record):
        def record(value, where):
            if not isinstance(value, dict):
                raise ContractError(f"{where}: expected an object, got {type(value).__name__}")
            return tp.from_json(value, where)
        return record
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        def member(value, where):
            if not isinstance(value, bool):
                try:
                    return tp(value)
                except ValueError:
                    pass
            raise ContractError(f"{where}: {value!r} is not one of {[m.value for m in tp]}")
        return member
    wanted = (int, float) if tp is float else tp

    def scalar(value, where):  # (bool is an int to isinstance: never taken for one, nor one for a number)
        if isinstance(value, wanted) and (tp is bool or type(value) is not bool):
            return float(value) if tp is float else value
        raise ContractError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r:.80}")
    if tp in (int, str, bool, float, bytes):  # bytes: a frame's payload (Channel)
        return scalar
    raise TypeError(f"no JSON form for {tp!r}")


@functools.cache
def _plan(cls: type) -> tuple[tuple[str, typing.Callable[[Any, str], Any], bool], ...]:
    """Per field of a record: its name, its converter, whether it is required. Once per class: evaluating the
    string annotations (`typing.get_type_hints`, compiling each) and the field types anew at every message would
    be paid on the critical path of a servicing."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, _converter(hints[f.name]),
                  f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                 for f in dataclasses.fields(cls))


class Record:
    """A frozen dataclass with one JSON form: `to_json()` and its inverse `from_json()`."""

    def to_json(self) -> dict[str, Any]:
        return {name: _to_json(getattr(self, name)) for name, _, _ in _plan(type(self))}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str | None = None):
        where = where or cls.__name__
        kwargs = {}
        for name, conv, required in _plan(cls):
            if name in data:
                kwargs[name] = conv(data[name], f"{where}.{name}")
            elif required:
                raise ContractError(f"{where}: missing field {name!r}")
        return cls(**kwargs)


class Message(Record):
    """A message on the servicing channel; `kind` is its "type"."""

    kind: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, **super().to_json()}


# -- what the host tells a worker on its command line ----------------------------------------------------
class _CommaArg:
    """A worker option value `A,B,...`: the dataclass fields in order; ints, and strings that are not empty."""

    option: ClassVar[str]

    @classmethod
    def parse(cls, text: str):
        """Trailing fields with a default may be left out."""
        fields = dataclasses.fields(cls)
        required = sum(f.default is dataclasses.MISSING for f in fields)
        parts = text.split(",")
        if not required <= len(parts) <= len(fields) or not all(parts):
            raise ValueError(f"bad {cls.option} {text!r}: expected {','.join(f.name.upper() for f in fields)}")
        try:
            return cls(*(int(p) if f.type == "int" else p for f, p in zip(fields, parts)))
        except ValueError:
            ints = [f.name for f in fields if f.type == "int"]
            raise ValueError(f"bad {cls.option} {text!r}: {', '.join(ints)} must be "
                             f"{'an integer' if len(ints) == 1 else 'integers'}") from None

    def to_arg(self) -> str:
        return ",".join(str(getattr(self, f.name)) for f in dataclasses.fields(self))


@dataclass(frozen=True)
class NicConfig(_CommaArg):
    """What the host tells a worker about NIC `index` (`--nic`): its PCI id, vfio-user socket and ring eventfds;
    INDEX places the NIC's rings (ChannelLayout) in guest RAM."""

    option = "--nic"
    index: int
    pci_id: str
    socket: str
    tx_bell_fd: int
    rx_bell_fd: int


@dataclass(frozen=True)
class NvmeConfig(_CommaArg):
    """What the host tells a worker about NVMe controller `index` (`--nvme`): its PCI id, vfio-user socket and,
    when the guest has a block channel for it (disk INDEX of `--block-layout`), the channel's eventfds."""

    option = "--nvme"
    index: int
    pci_id: str
    socket: str
    request_fd: int = -1
    completion_fd: int = -1


# -- records inside messages ---------------------------------------------------------------------------
#: How a NIC's `error` begins when it is only a note: the pool had no room, so the NIC works on worker RAM
#: and only its next keepalive is lost (the worker's `VfManager`; the host's servicing status reads it).
POOL_EXHAUSTED = "pool exhausted"


@dataclass(frozen=True)
class NicRestore(Record):
    """How one NIC came up in a worker (`started`, and `save_failed`'s revived NICs)."""

    pci_id: str
    restore_path: RestorePath
    error: str | None = None
    flr: bool = False
    create_ms: float = 0.0


@dataclass(frozen=True)
class NicSaveOutcome(Record):
    pci_id: str
    save_outcome: SaveOutcome
    error: str | None = None
    #: The NIC's relay counters once its IO stopped for the save: they end with this worker, so a drop it
    #: counted last (e.g. sends stranded by a device found gone) is only visible here.
    relay: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class UnclaimedAllocation(Record):
    """A saved pool allocation no device re-attached (DESIGN D3); listed in the servicing result."""

    device: str
    base_pfn: int
    pages: int
    tag: str


# -- messages --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello(Message):
    kind = "hello"
    pid: int
    version: str
    compat: str  # "current" | "downlevel" (a worker from before MANA keepalive)
    generation: int
    keepalive: dict[str, str] = field(default_factory=dict)  # {"mana", "nvme"}: canonical config strings


@dataclass(frozen=True)
class Start(Message):
    """Bring the configured NICs up (spec §3). `servicing` is the platform setting "servicing scenario": the
    worker then fetches the saved state (restore_state_request) before anything else."""

    kind = "start"
    servicing: bool = False


@dataclass(frozen=True)
class Started(Message):
    """`nics` and `nvme`: how each NIC and NVMe controller came up (a controller's record is a `NicRestore`)."""

    kind = "started"
    nics: tuple[NicRestore, ...]
    unclaimed_pool_allocations: tuple[UnclaimedAllocation, ...] = ()
    error: str | None = None
    phases_ms: dict[str, float] = field(default_factory=dict)
    nvme: tuple[NicRestore, ...] = ()


@dataclass(frozen=True)
class RestoreStateRequest(Message):
    """"Restore guest VTL2 state" with REQUEST_DATA: the new worker asks for the saved state (spec §2.5)."""

    kind = "restore_state_request"
    status: TransferStatus = TransferStatus.REQUEST_DATA


@dataclass(frozen=True)
class RestoreState(Message):
    """One response to the request: `length` is the header's data length and must equal len(payload) (the
    worker checks it: a mismatch is fatal). MORE_DATA continues, SUCCESS ends, FAILURE aborts."""

    kind = "restore_state"
    length: int
    status: TransferStatus
    payload: bytes = b""


@dataclass(frozen=True)
class RestoreCompleted(Message):
    """The new worker restored (SUCCESS) or could not (FAILURE) before it starts the guest's NICs (spec §2.5)."""

    kind = "restore_completed"
    status: TransferStatus


@dataclass(frozen=True)
class Save(Message):
    """Save for servicing (spec §2.2): the host's capability word (§1.3) and timeout hint in seconds (§2.1:
    the worker's watchdog; NO_TIMEOUT_HINT_S means none). Test hooks: `test_config` (SAVE_TEST_CONFIGS) and
    `kill_point`, a save point of `vfkeep.kill_points` where the worker SIGKILLs itself (a worker that does not
    know the field ignores it)."""

    kind = "save"
    capabilities: int
    timeout_hint_s: int = 60
    correlation_id: str | None = None
    test_config: str | None = None
    kill_point: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.capabilities < 1 << 64 or self.capabilities & RESERVED_CAPABILITIES:
            raise ContractError(f"save.capabilities {self.capabilities:#x}: a u64 whose bits 2..63 are reserved "
                                "and must be zero")
        if not 0 <= self.timeout_hint_s <= 0xFFFF:
            raise ContractError(f"save.timeout_hint_s {self.timeout_hint_s} is not a u16")

    @property
    def mana_keepalive(self) -> bool:
        return bool(self.capabilities & HostCapabilities.MANA_KEEPALIVE)

    @property
    def nvme_keepalive(self) -> bool:
        return bool(self.capabilities & HostCapabilities.NVME_KEEPALIVE)

    @property
    def timeout_s(self) -> float:
        return NO_TIMEOUT_S if self.timeout_hint_s >= NO_TIMEOUT_HINT_S else float(self.timeout_hint_s)


@dataclass(frozen=True)
class SaveState(Message):
    """One "save guest VTL2 state" message of the old worker (spec §2.5): MORE_DATA with the next at most
    MAX_CHUNK bytes of the state, SUCCESS with the last ones and the save report (`nics`, `phases_ms`), or
    FAILURE alone, without payload: the save failed (`error`), the worker revived its NICs (`revived`) and
    keeps running (§2.4). The host answers the SUCCESS message once (`SaveStateAnswer`), never a FAILURE.
    `nvme` and `revived_nvme` are the same reports for the NVMe controllers."""

    kind = "save_state"
    status: TransferStatus
    payload: bytes = b""
    nics: tuple[NicSaveOutcome, ...] = ()
    phases_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    revived: tuple[NicRestore, ...] = ()
    nvme: tuple[NicSaveOutcome, ...] = ()
    revived_nvme: tuple[NicRestore, ...] = ()


@dataclass(frozen=True)
class SaveStateAnswer(Message):
    """The host's one answer to the last chunk: SUCCESS, it keeps the state (the worker exits); FAILURE, it
    does not (the worker handles a failed save, §2.4, and reports it with a FAILURE message)."""

    kind = "save_state_answer"
    status: TransferStatus


def save_state_messages(blob: bytes, nics: tuple[NicSaveOutcome, ...] = (),
                        phases_ms: dict[str, float] | None = None,
                        nvme: tuple[NicSaveOutcome, ...] = ()) -> list[SaveState]:
    """The old worker's messages for `blob`: MORE_DATA chunks of MAX_CHUNK bytes, then SUCCESS with the rest
    (possibly empty) and the report."""
    view = memoryview(blob)
    cut = max(0, (len(blob) - 1) // MAX_CHUNK) * MAX_CHUNK
    msgs = [SaveState(TransferStatus.MORE_DATA, bytes(view[i:i + MAX_CHUNK])) for i in range(0, cut, MAX_CHUNK)]
    msgs.append(SaveState(TransferStatus.SUCCESS, bytes(view[cut:]), tuple(nics), dict(phases_ms or {}),
                          nvme=tuple(nvme)))
    return msgs


def restore_state_messages(blob: bytes, final: bool = True) -> list[RestoreState]:
    """The host's responses carrying `blob`: MORE_DATA chunks of MAX_CHUNK bytes, the last one SUCCESS; with
    `final` False all of them MORE_DATA, and `STATE_GO` ends the transfer later (the host's handoff: the state
    travels while the host scrubs, the end of the transfer is the go to restore)."""
    msgs = [RestoreState(len(chunk), TransferStatus.MORE_DATA, chunk) for chunk in
            (blob[i:i + MAX_CHUNK] for i in range(0, max(len(blob), 1), MAX_CHUNK))]
    if final:
        last = msgs[-1]
        msgs[-1] = RestoreState(last.length, TransferStatus.SUCCESS, last.payload)
    return msgs


#: The response that ends a transfer whose bytes went ahead as MORE_DATA (spec §2.5: SUCCESS, zero-length payload).
STATE_GO = RestoreState(0, TransferStatus.SUCCESS)


@dataclass(frozen=True)
class Inspect(Message):
    kind = "inspect"


@dataclass(frozen=True)
class InspectReply(Message):
    kind = "inspect"
    tree: dict[str, Any]


@dataclass(frozen=True)
class Shutdown(Message):
    kind = "shutdown"


@dataclass(frozen=True)
class Bye(Message):
    kind = "bye"


@dataclass(frozen=True)
class ErrorReply(Message):
    kind = "error"
    error: str


HOST_MESSAGES: dict[str, type[Message]] = {m.kind: m for m in (Start, RestoreState, Save, SaveStateAnswer, Inspect,
                                                               Shutdown)}
WORKER_MESSAGES: dict[str, type[Message]] = {m.kind: m for m in (Hello, RestoreStateRequest, RestoreCompleted, Started,
                                                                 SaveState, InspectReply, Bye, ErrorReply)}


def decode(data: Any, kinds: dict[str, type[Message]]) -> Message:
    """The message in `data` (a parsed frame), one of `kinds` (HOST_MESSAGES or WORKER_MESSAGES)."""
    if not isinstance(data, dict):
        raise ContractError(f"a message is a JSON object, got {type(data).__name__}")
    cls = kinds.get(data.get("type"))
    if cls is None:
        raise ContractError(f"unexpected message {data.get('type')!r}")
    return cls.from_json(data, data["type"])


# -- the servicing result (DESIGN §10) -----------------------------------------------------------------
class ServicingStatus(enum.StrEnum):
    """How a servicing went, for scripts: `ok` = every NIC took the path requested of it; `degraded` = the
    servicing completed but a NIC did not (its `reason` says why: keepalive requested, FLR fallback taken);
    `failed` = the servicing itself failed (save, worker, restore; `error` says why). NICs always come back."""

    OK = "ok"
    DEGRADED = "degraded"
    FAILED = "failed"


@dataclass(frozen=True)
class NicResult(Record):
    """One NIC of a servicing: the path the worker took and what the device itself saw."""

    pci_id: str
    restore_path: RestorePath
    device_reset: bool     # the device counted an FLR
    hwc_established: bool  # the device's command log has an ESTABLISH_HWC
    device_resets: int = 0  # FLRs, HWC requests and SMC messages the device counted during the servicing
    hwc_requests: int = 0
    smc_messages: int = 0
    error: str | None = None
    #: Why the path is not keepalive (set whenever it is not: "keepalive not requested", "save refused: ...",
    #: "saved state rejected: ...", ...), or what a keepalive NIC lost (e.g. "pool exhausted ...").
    reason: str | None = None
    #: The path this NIC was asked to take: keepalive when the host requested MANA keepalive, else fresh.
    requested_path: RestorePath = RestorePath.FRESH


@dataclass(frozen=True)
class NvmeResult(Record):
    """One NVMe controller of a servicing: the path the worker took and what the controller itself saw."""

    pci_id: str
    restore_path: RestorePath
    device_reset: bool         # the controller was reset: CC.EN 1->0 or an FLR
    controller_enabled: bool   # the controller saw CC.EN 0->1 (a fresh init)
    error: str | None = None
    #: Why the path is not keepalive, as for a NIC ("keepalive not requested", ...).
    reason: str | None = None
    #: keepalive when the host requested NVMe keepalive, else fresh.
    requested_path: RestorePath = RestorePath.FRESH
    admin_commands: tuple[str, ...] = ()  # admin commands the controller fetched during the servicing


@dataclass(frozen=True)
class ServicingResult(Record):
    """What `vfkeep service --json` prints, the control socket's `service` returns and `last_servicing` keeps.
    `ok` is false only when the servicing failed; `status` also tells a degraded one apart."""

    ok: bool
    mana_keepalive: bool
    nvme_keepalive: bool
    nics: tuple[NicResult, ...]
    unclaimed_pool_allocations: tuple[UnclaimedAllocation, ...]
    phases_ms: dict[str, float | None]  # save, handoff, replacement, restore, total; null: did not happen
    blackout_ms: float | None = None  # from the guest traffic agents; null without traffic
    frames_lost: int | None = None
    timing: dict[str, Any] = field(default_factory=dict)  # the devices' timing parameters (DESIGN D9)
    error: str | None = None
    status: ServicingStatus = ServicingStatus.OK
    nvme: tuple[NvmeResult, ...] = ()
    io_blackout_ms: float | None = None  # from the guest disk agents; null without disk IO
    io_errors: int | None = None


# -- the channel -----------------------------------------------------------------------------------------
_HEADER = struct.Struct("<II")  # JSON length, payload length
MAX_MESSAGE = 64 << 20


class ChannelClosed(Exception):
    """The peer went away (EOF or reset)."""


class ChannelTimeout(Exception):
    """No message arrived in time."""


class Channel:
    """Framing only: a JSON object and its raw payload, both length-prefixed. `send(msg.to_json())`,
    `decode(recv(), kinds)`; a top-level `payload` (bytes) travels as the frame's payload, unencoded."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = bytearray()

    @classmethod
    def pair(cls) -> tuple["Channel", "Channel"]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(a), cls(b)

    @classmethod
    def from_fd(cls, fd: int) -> "Channel":
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, msg: dict[str, Any]) -> None:
        self.send_frame(self.frame(msg))

    @staticmethod
    def frame(msg: dict[str, Any]) -> bytes:
        """`msg` as the bytes `send` writes: a message made ahead of its moment (the host's go after its scrub)
        leaves with one system call."""
        payload = msg.get("payload", b"")
        if isinstance(payload, bytes):
            msg = {k: v for k, v in msg.items() if k != "payload"}
        else:
            payload = b""
        data = json.dumps(msg, separators=(",", ":")).encode()
        return b"".join((_HEADER.pack(len(data), len(payload)), data, payload))

    def send_frame(self, frame: bytes) -> None:
        try:
            self.sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ChannelClosed(str(e)) from e

    def recv(self, timeout: float | None = None, first=None) -> Any:
        """Next frame, parsed (ValueError when it is not JSON), its payload (if any) as `payload` when the
        JSON is an object; `timeout` None waits forever. `first(text, payload)` sees the frame's JSON text and
        payload (bytes) before the text is parsed: a frame known by its first bytes is acted on without waiting
        for the parse (the host's on the old worker's last one, inside the guest's blackout: ~0.1 ms, run cold)."""
        end = self._buffer_frame(timeout)
        n, p = _HEADER.unpack_from(self._buf)
        text = bytes(self._buf[_HEADER.size:_HEADER.size + n])
        payload = bytes(self._buf[_HEADER.size + n:end])
        del self._buf[:end]
        if first is not None:
            first(text, payload)
        msg = json.loads(text)
        if p and isinstance(msg, dict):
            msg["payload"] = payload
        return msg

    def take(self, frame: bytes, timeout: float | None = None) -> bool:
        """Wait for the next frame as `recv` does; when its bytes are `frame`'s (made by `frame`), consume it and
        return True, else leave it for `recv` and return False: a message known to the byte (the host's go) is then
        recognized without parsing or decoding it."""
        end = self._buffer_frame(timeout)
        if end != len(frame) or self._buf[:end] != frame:
            return False
        del self._buf[:end]
        return True

    def _buffer_frame(self, timeout: float | None) -> int:
        """Read until a whole frame is buffered (ChannelTimeout after `timeout`, None: forever): its end."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if len(self._buf) >= _HEADER.size:
                n, p = _HEADER.unpack_from(self._buf)
                if n > MAX_MESSAGE or p > MAX_MESSAGE:
                    raise ChannelClosed(f"message of {n} + {p} bytes exceeds {MAX_MESSAGE}")
                end = _HEADER.size + n + p
                if len(self._buf) >= end:
                    return end
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                raise ChannelTimeout("no message from peer in time")
            r, _, _ = select.select([self.sock], [], [], remaining)
            if not r:
                raise ChannelTimeout("no message from peer in time")
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError as e:
                raise ChannelClosed(str(e)) from e
            if not chunk:
                raise ChannelClosed("peer closed the channel")
            self._buf += chunk

    def ready(self, timeout: float = 0.0) -> bool:
        """A whole frame is buffered or the peer has sent more (or closed): a `recv` now would not wait for it to
        send. `timeout`: how long to wait for that (seconds)."""
        if len(self._buf) >= _HEADER.size:
            n, p = _HEADER.unpack_from(self._buf)
            if len(self._buf) >= _HEADER.size + n + p:
                return True
        return bool(select.select([self.sock], [], [], timeout)[0])

    def close(self) -> None:
        self.sock.close()


def _state_ahead_template() -> tuple[bytes, bytes]:
    """The JSON `Channel.frame` makes of a MORE_DATA `RestoreState`, cut where its length goes."""
    mark = 987654321987654321
    text = Channel.frame(RestoreState(mark, TransferStatus.MORE_DATA).to_json())[_HEADER.size:]
    head, tail = text.split(b"%d" % mark)
    return head, tail


_AHEAD_HEAD, _AHEAD_TAIL = _state_ahead_template()
#: `STATE_GO` as it goes on the channel, made once: the host sends it right after its scrub and the new worker knows
#: it by its bytes (`Channel.take`), both inside the guest's blackout.
STATE_GO_FRAME = Channel.frame(STATE_GO.to_json())


def state_ahead_frames(blob: bytes) -> bytes:
    """The frames `Channel.frame` makes of `restore_state_messages(blob, final=False)`, back to back, for one send:
    the host sends them after the old worker's last frame, inside the guest's blackout, where making each message's
    record and JSON cost about 0.1 ms of Python run cold; here only the length goes into the same JSON."""
    out: list[bytes] = []
    for i in range(0, max(len(blob), 1), MAX_CHUNK):
        chunk = blob[i:i + MAX_CHUNK]
        text = b"%s%d%s" % (_AHEAD_HEAD, len(chunk), _AHEAD_TAIL)
        out += (_HEADER.pack(len(text), len(chunk)), text, chunk)
    return b"".join(out)


def _plan_every_record() -> None:
    """Every record's plan, made once at import (a worker imports this before its hello) rather than at the first
    `from_json` of each class, which for the next worker is the saved state inside the servicing window (about
    0.25 ms)."""
    todo = [Record]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if dataclasses.is_dataclass(cls):
            _plan(cls)


_plan_every_record()
