"""User-mode NVMe driver (spec `nvme.md` §2-14): `driver` (NvmeDriver: bring-up, IO, AER, save/restore),
`queues` (queue pair: rings, CIDs, pending table, page allocator, PRPs), `namespace`, `saved_state`
(validation of untrusted saved state), `errors`. Wire formats come only from `vfkeep.nvme`."""
