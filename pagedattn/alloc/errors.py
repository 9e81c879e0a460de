"""Typed errors of the block allocator.

Every error derives from :class:`AllocatorError`, so an engine can catch them all in one place.
A call that raises one of them has left the allocator exactly as it was before the call: all
checks run before the first mutation, so nothing is ever half-done (no partial allocation, no
half-swapped group).
"""

from __future__ import annotations

__all__ = [
    "AllocatorError",
    "OutOfBlocksError",
    "UnknownSequenceError",
    "FreedSequenceError",
    "DoubleFreeError",
    "DuplicateSequenceError",
    "SwapError",
    "InvalidArgumentError",
    "InvariantViolation",
]


class AllocatorError(Exception):
    """Base class of every error raised by :mod:`pagedattn.alloc`."""


class OutOfBlocksError(AllocatorError):
    """Not enough free blocks on a device for the request; nothing was allocated.

    Attributes:
        device: ``"gpu"`` or ``"cpu"``, the pool that ran short.
        num_required: blocks the call needed from the free queue.
        num_free: free blocks the pool had.
    """

    def __init__(self, message: str, *, device: str, num_required: int, num_free: int) -> None:
        super().__init__(message)
        self.device = device
        self.num_required = num_required
        self.num_free = num_free


class UnknownSequenceError(AllocatorError):
    """The sequence id was never allocated (or was freed so long ago it is no longer remembered)."""


class FreedSequenceError(UnknownSequenceError):
    """The sequence was freed; it cannot be appended to, forked, swapped or queried."""


class DoubleFreeError(AllocatorError):
    """A sequence or a block was freed twice."""


class DuplicateSequenceError(AllocatorError):
    """A sequence id that is already live was given to ``allocate`` or ``fork``."""


class SwapError(AllocatorError):
    """A swap request is inconsistent with where the sequences live (e.g. swapping in a running one)."""


class InvalidArgumentError(AllocatorError, ValueError):
    """An argument has the wrong shape, type or value."""


class InvariantViolation(AllocatorError, AssertionError):
    """``check_invariants`` found the allocator's bookkeeping inconsistent (a bug)."""
