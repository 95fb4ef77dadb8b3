"""The host<->worker contract: the servicing channel, its messages, the names both sides share, the servicing result.

The host (`vfkeep.host`) and the worker (`vfkeep.paravisor`) import only this module from each other's
side: the host process never loads driver, gdma or vfio-user code, and a worker of another version
(`--worker-cmd`) only has to speak what is written here. Standard library only.

Channel: a socketpair the host creates; the worker inherits its end as `--channel-fd`. A message is a
little-endian u32 length and a JSON object `{"type": KIND, ...fields}`; the ServicingState blob travels
base64-encoded inside it, so every message is one self-describing object.

    worker -> host  hello       once its imports are done
    host -> worker  start       -> started
    host -> worker  save        -> saved, and the worker exits without resetting kept devices
                                   | save_failed: it revived its NICs and keeps running (spec §2.4, DESIGN D5)
    host -> worker  inspect     -> inspect
    host -> worker  shutdown    -> bye, after a normal shutdown of every NIC
    worker -> host  error       the worker cannot take that message in its state

Decoding checks every field's type: a message that does not fit is a `ContractError`, which the host
treats as a failed worker (DESIGN D4). Unknown fields are ignored and fields with a default may be
absent, so either side can grow a field without breaking the other.
"""
from __future__ import annotations

import base64
import dataclasses
import enum
import json
import select
import socket
import struct
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
#: "1": unrestored pool allocations fail the restore, as in OpenHCL (DESIGN D3).
STRICT_POOL_ENV = "VFKEEP_STRICT_POOL"
#: Servicing test hooks (spec §2.4), also settable per save request.
TEST_CONFIG_ENV = "VFKEEP_TEST_CONFIG"
#: The hooks a save request may carry (`Save.test_config`; the worker matches them case-insensitively).
SAVE_TEST_CONFIGS = ("SERVICING_SAVE_FAIL", "SERVICING_SAVE_STUCK", "SERVICING_SAVE_CRASH")


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


def _from_json(tp: Any, value: Any, where: str) -> Any:
    """`value` (parsed JSON) as type `tp`, or ContractError naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _from_json(inner, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise ContractError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_from_json(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ContractError(f"{where}: expected an object, got {type(value).__name__}")
        return value
    if isinstance(tp, type) and issubclass(tp, Record):
        if not isinstance(value, dict):
            raise ContractError(f"{where}: expected an object, got {type(value).__name__}")
        return tp.from_json(value, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ContractError(f"{where}: {value!r} is not one of {[m.value for m in tp]}") from None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
        return value
    raise ContractError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r:.80}")


class Record:
    """A frozen dataclass with one JSON form: `to_json()` and its inverse `from_json()`."""

    def to_json(self) -> dict[str, Any]:
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str | None = None):
        where = where or cls.__name__
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                kwargs[f.name] = _from_json(hints[f.name], data[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ContractError(f"{where}: missing field {f.name!r}")
        return cls(**kwargs)


class Message(Record):
    """A message on the servicing channel; `kind` is its "type"."""

    kind: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, **super().to_json()}


def encode_blob(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def decode_blob(text: str | None) -> bytes | None:
    """The blob of a `servicing_state` field; ValueError when it is not base64."""
    return None if text is None else base64.b64decode(text.encode(), validate=True)


# -- what the host tells a worker on its command line ----------------------------------------------------
class _CommaArg:
    """A worker option value `A,B,...`: the dataclass fields in order; ints, and strings that are not empty."""

    option: ClassVar[str]

    @classmethod
    def parse(cls, text: str):
        fields = dataclasses.fields(cls)
        parts = text.split(",")
        if len(parts) != len(fields) or not all(parts):
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
    """What the host tells a worker about NVMe controller `index` (`--nvme`): its PCI id and vfio-user socket."""

    option = "--nvme"
    index: int
    pci_id: str
    socket: str


# -- records inside messages ---------------------------------------------------------------------------
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
    """Restore from the blob (or start fresh without one) and bring the configured NICs up (spec §3)."""

    kind = "start"
    servicing_state: str | None = None  # base64 (encode_blob)


@dataclass(frozen=True)
class Started(Message):
    kind = "started"
    nics: tuple[NicRestore, ...]
    unclaimed_pool_allocations: tuple[UnclaimedAllocation, ...] = ()
    error: str | None = None
    phases_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Save(Message):
    """Save for servicing (spec §2.2) with the host's keepalive flags; `timeout_s` arms the watchdog (§2.1)."""

    kind = "save"
    mana_keepalive: bool
    nvme_keepalive: bool
    timeout_s: float = 60.0
    correlation_id: str | None = None
    test_config: str | None = None


@dataclass(frozen=True)
class Saved(Message):
    kind = "saved"
    servicing_state: str | None  # base64 of the ServicingState blob; untrusted: decode_blob may fail
    nics: tuple[NicSaveOutcome, ...] = ()
    phases_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SaveFailed(Message):
    kind = "save_failed"
    error: str
    nics: tuple[NicSaveOutcome, ...] = ()
    revived: tuple[NicRestore, ...] = ()


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


HOST_MESSAGES: dict[str, type[Message]] = {m.kind: m for m in (Start, Save, Inspect, Shutdown)}
WORKER_MESSAGES: dict[str, type[Message]] = {m.kind: m for m in (Hello, Started, Saved, SaveFailed, InspectReply,
                                                                 Bye, ErrorReply)}


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
class ServicingResult(Record):
    """What `vfkeep service --json` prints, the control socket's `service` returns and `last_servicing` keeps.
    `ok` is false only when the servicing failed; `status` also tells a degraded one apart."""

    ok: bool
    mana_keepalive: bool
    nvme_keepalive: bool
    nics: tuple[NicResult, ...]
    unclaimed_pool_allocations: tuple[UnclaimedAllocation, ...]
    phases_ms: dict[str, float]  # save, handoff, restore, total
    blackout_ms: float | None = None  # from the guest traffic agents; null without traffic
    frames_lost: int | None = None
    timing: dict[str, Any] = field(default_factory=dict)  # the devices' timing parameters (DESIGN D9)
    error: str | None = None
    status: ServicingStatus = ServicingStatus.OK


# -- the channel -----------------------------------------------------------------------------------------
_LEN = struct.Struct("<I")
MAX_MESSAGE = 64 << 20


class ChannelClosed(Exception):
    """The peer went away (EOF or reset)."""


class ChannelTimeout(Exception):
    """No message arrived in time."""


class Channel:
    """Framing only: length-prefixed JSON objects. `send(msg.to_json())`, `decode(recv(), kinds)`."""

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
        data = json.dumps(msg, separators=(",", ":")).encode()
        try:
            self.sock.sendall(_LEN.pack(len(data)) + data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ChannelClosed(str(e)) from e

    def recv(self, timeout: float | None = None) -> Any:
        """Next frame, parsed (ValueError when it is not JSON); `timeout` None waits forever."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if len(self._buf) >= _LEN.size:
                (n,) = _LEN.unpack_from(self._buf)
                if n > MAX_MESSAGE:
                    raise ChannelClosed(f"message of {n} bytes exceeds {MAX_MESSAGE}")
                if len(self._buf) >= _LEN.size + n:
                    body = bytes(self._buf[_LEN.size:_LEN.size + n])
                    del self._buf[:_LEN.size + n]
                    return json.loads(body)
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

    def close(self) -> None:
        self.sock.close()
