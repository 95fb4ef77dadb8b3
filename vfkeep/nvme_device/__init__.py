"""NVMe controller emulator (`vfkeep nvme-device`), spec `nvme.md` §1-9 and §16-17.

`core` (registers, controller state machine, queues, completions; transport
independent), `admin` and `nvm` (command sets), `namespace` (sparse disk
file), `prp` (PRP walking), `faults` (command log, admin fault rules),
`control` (test hooks), `pci` (config space, BAR4), `dma` (in-process DMA
space), `server` (vfio-user adapter), `main` (CLI, `start_nvme_device`).
"""
