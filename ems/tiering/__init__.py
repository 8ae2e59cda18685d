"""The spill tier: blocks evicted from memory kept in checksummed segment files on disk."""
from ems.tiering.store import SpillStore
from ems.tiering.tier import SpillTier, open_tier

__all__ = ["SpillStore", "SpillTier", "open_tier"]
