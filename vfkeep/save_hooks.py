"""The servicing test hooks a save request may carry (spec §2.4), named apart from the contract that carries
them: `vfkeep service --test-config` offers them, and importing the contract (its two dozen dataclasses) was
about a tenth of every light command's start-up. No imports at all; the contract re-exports the names."""

#: The hooks a save request may carry (`Save.test_config`; the worker matches them case-insensitively).
SAVE_TEST_CONFIGS = ("SERVICING_SAVE_FAIL", "SERVICING_SAVE_STUCK", "SERVICING_SAVE_CRASH")
