"""The spill tier: blocks evicted from memory kept in checksummed segment files on disk."""
from ems.tiering.store import SpillStore

__all__ = ["SpillStore"]
