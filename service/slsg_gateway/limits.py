"""Bounded work: a memory budget shared by every frame decode of a gateway process.

Without it, memory grows with the number of large frames in flight: four 8000x6000 frames at
once took a gateway from 0.56 GB to 4.3 GB resident. Each decode reserves its estimated peak
(:meth:`slsg_gateway.imaging.OpenedFrame.cost_bytes`) before it starts and returns it when done;
a decode that does not fit waits. A frame larger than the whole budget waits until nothing else
is decoding and then runs alone, so any frame under ``max_pixels`` is still served.
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator


class DecodeBudget:
    """At most ``capacity`` bytes reserved at once, granted in the order asked."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"decode budget must be positive, got {capacity} bytes")
        self.capacity = capacity
        self.reserved = 0
        self._waiting: deque[object] = deque()
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[int]:
        """Hold ``nbytes`` (at most the whole budget) for the duration of the block."""
        share = min(max(nbytes, 0), self.capacity)
        ticket = object()
        async with self._changed:
            self._waiting.append(ticket)
            try:  # in arrival order, so a large frame is not overtaken forever by small ones
                await self._changed.wait_for(
                    lambda: self._waiting[0] is ticket and self.reserved + share <= self.capacity)
            finally:
                self._waiting.remove(ticket)
                self._changed.notify_all()
            self.reserved += share
        try:
            yield share
        finally:
            async with self._changed:
                self.reserved -= share
                self._changed.notify_all()
