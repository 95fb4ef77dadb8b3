"""Save/restore vocabulary shared by every keepalive component (DMA manager, MANA driver, NVMe next).

Saved state is untrusted input (DESIGN §6): a component that cannot save raises a `SaveError`, one that
cannot use its saved state a `RestoreError` (`InvalidSavedState` when the state itself is malformed or does
not fit this boot: nothing was touched), and the caller takes its fallback — never a crash. Each device
kind subclasses these in its own error module, so a caller can catch a whole kind or every kind at once.
"""
from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)


class SaveError(Exception):
    """A component cannot be saved in its current state; it should be shut down (or reset) instead."""


class RestoreError(Exception):
    """Saved state cannot be restored; the component takes its fallback path."""


class InvalidSavedState(RestoreError):
    """Saved state is malformed or does not fit this boot; nothing was written or attached."""


def parse_saved(cls: type[M], state: M | bytes | bytearray | memoryview, what: str,
                error: type[Exception] = InvalidSavedState) -> M:
    """`state` as a `cls` message: passed through, or decoded from bytes. Anything else, or bytes that do
    not decode, raise `error` naming `what` — saved state is untrusted input, never a protobuf exception."""
    if isinstance(state, cls):
        return state
    if not isinstance(state, (bytes, bytearray, memoryview)):
        raise error(f"{what} must be a {cls.__name__} or bytes, got {type(state).__name__}")
    try:
        return cls.FromString(bytes(state))
    except DecodeError as e:
        raise error(f"{what} does not decode ({len(state)} bytes): {e}") from None
