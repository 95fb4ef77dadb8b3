"""Saved-state schemas (.proto) and their generated modules (`vfkeep.savestate.parse_saved` decodes them)."""
