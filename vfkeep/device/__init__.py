"""MANA (GDMA) VF emulator (spec gdma.md), served over vfio-user by `vfkeep device`.

`core.GdmaDevice` is the transport-independent model (usable in-process with
`dma.MappedMemory`); `server.ManaVfioDevice` adapts it to `VfioUserServer`;
`main` is the CLI. Modules follow the hardware: `bar0`, `pci`, `smc`, `hwc`,
`requests` (GDMA §9), `bnic` (§11), `queues`, `vport` (data path),
`backends`, `faults` and `control` (test hooks), `mac` (vport MACs).
"""
