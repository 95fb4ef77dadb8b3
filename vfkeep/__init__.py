"""vfkeep: service (replace) a device-driver process while its devices keep running.

A runnable model of OpenHCL servicing with MANA keepalive; see docs/ and
../shared/DESIGN.md for the architecture.
"""

__version__ = "0.1.0"
