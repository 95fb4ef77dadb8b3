"""Saved-state schemas (.proto) and their generated modules; `parse_saved` for untrusted blobs."""
from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)


def parse_saved(cls: type[M], state: M | bytes | bytearray | memoryview, what: str,
                error: type[Exception]) -> M:
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
