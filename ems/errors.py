"""Typed exceptions raised by EMS.

Every error names the offending value and the limit it broke. Errors that come from bad
arguments also derive from ValueError, and errors about the operating system from OSError,
so callers can catch them by the standard type too.
"""


class EMSError(Exception):
    """Base class of every EMS error."""


class InvalidKeyError(EMSError, ValueError):
    """A block key that is not exactly 32 bytes."""


class BufferSizeError(EMSError, ValueError):
    """A source or destination buffer whose size does not match the block."""


class BufferNotContiguousError(EMSError, ValueError):
    """A buffer whose bytes are not one contiguous range."""


class BufferNotWritableError(EMSError, ValueError):
    """A read-only buffer passed as a destination."""


class BlockTooLargeError(EMSError, ValueError):
    """A block larger than the pool's maximum block size (its slab size)."""


class EmptyBlockError(EMSError, ValueError):
    """A block of zero bytes."""


class CapacityError(EMSError, ValueError):
    """A pool capacity or slab size the pool cannot be built with."""


class PoolFullError(EMSError):
    """No block could be evicted to make room: every block is pinned or reserved."""


class ReadOnlyPoolError(EMSError):
    """A write on a pool handle that does not own the pool (attached or forked)."""


class PoolClosedError(EMSError):
    """A call on a pool handle after close()."""


class PoolSuspendedError(EMSError):
    """A reservation on a suspended pool (Pool.set_suspended), which stores nothing."""


class ArenaError(EMSError, OSError):
    """The pool's memory could not be mapped with the requested page kind."""


class AttachError(EMSError, OSError):
    """A pool could not be attached: unknown name, owner gone, or not an EMS pool."""


class MembershipError(EMSError, ConnectionError):
    """The cluster membership service (ZooKeeper) could not be reached or did not respond."""


class NodeIdInUseError(EMSError):
    """A node id that another live daemon has already registered in the cluster."""


class TransferError(EMSError, OSError):
    """A call to another EMS node failed: refused, timed out, or the connection broke."""


class AuthenticationError(TransferError):
    """A daemon refused the connection: no or wrong cluster secret."""


class ProtocolVersionError(TransferError):
    """The two sides share no protocol version."""
