"""The payload buffers of one NBD connection, kept and reused instead of allocated per request.

A read is decrypted into a buffer that the reply is then sent from; a write's payload is received into
a buffer that is then encrypted in place and written from. Allocating those per request cost more than
the crypto: every large ``bytearray`` is zero-filled, and the allocator hands big blocks back to the
kernel and faults them in again. Here a buffer is taken for a request and given back when it is free:

- a write's buffer once the write is done (:meth:`Buffers.give`);
- a read reply's buffer only once the connection has sent everything it was given
  (:meth:`keysteward.proxy.wire.Wire.sent`): the transport keeps a reference, not a copy, until then.

At most :data:`KEEP_BYTES` of free buffers are kept per connection; buffers hold guest data, never key
material, and leave with the connection.
"""

from __future__ import annotations

from collections.abc import Callable

KEEP_BYTES = 16 * 1024 * 1024
"""Free buffer bytes one connection keeps for reuse (the rest is left to the garbage collector)."""


class Buffers:
    """Buffers by size for one connection; used from its event loop's thread only."""

    def __init__(self, sent: Callable[[], bool]) -> None:
        self._sent = sent
        self._free: dict[int, list[bytearray]] = {}
        self._free_bytes = 0
        self._lent: list[bytearray] = []
        """Handed to the wire inside a reply: free once the wire has sent everything."""

    def take(self, size: int) -> bytearray:
        """A buffer of exactly ``size`` bytes (its contents are whatever a request left in it)."""
        if self._lent and self._sent():
            lent, self._lent = self._lent, []
            for buf in lent:
                self.give(buf)
        free = self._free.get(size)
        if free:
            self._free_bytes -= size
            return free.pop()
        return bytearray(size)

    def lend(self, buf: bytearray) -> None:
        """``buf`` is part of a reply being sent: reuse it once the wire has sent everything."""
        self._lent.append(buf)

    def give(self, buf: bytearray) -> None:
        """``buf`` is free now."""
        size = len(buf)
        if self._free_bytes + size <= KEEP_BYTES:
            self._free.setdefault(size, []).append(buf)
            self._free_bytes += size
