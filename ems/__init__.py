"""EMS, the Elastic Memory Service: a shared-memory pool for LLM KV-cache blocks.

    import ems
    pool = ems.Pool(1 << 30)
    pool.put(key32, block_bytes)
    pool.get_into(key32, destination)
"""
from ems import errors
from ems._core import KEY_BYTES, Reservation, crc32c, default_slab_size
from ems.pool import Pool
from ems.client import connect

__all__ = ["KEY_BYTES", "Pool", "Reservation", "connect", "crc32c", "default_slab_size",
           "errors"]
__version__ = "0.1.0"
