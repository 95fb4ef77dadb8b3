"""Errors of the NVMe emulator core; the transport adapter translates its own faults into these."""


class DmaError(Exception):
    """A DMA access outside the driver's mapped memory (the adapter raises it for the core)."""


class RegisterAccessError(ValueError):
    """A BAR0 access the controller refuses (bad offset, size, alignment or a read-only register)."""
