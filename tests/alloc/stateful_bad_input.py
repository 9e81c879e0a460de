"""The allocator state machine's bad-input rules: every refused call leaves the state unchanged.

A mixin of ``AllocatorMachine`` (test_alloc_stateful.py): needs its ``mgr``, ``tokens``,
``swapped``, ``freed``, ``next_id``, ``count`` and ``expect_unchanged``.
"""

from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from pagedattn.alloc import (DoubleFreeError, DuplicateSequenceError, FreedSequenceError, SwapError,
                             UnknownSequenceError)


class BadInputRules:
    """Use after free, unknown ids, duplicate ids and swapping the wrong way."""

    @precondition(lambda self: self.freed)
    @rule(pick=st.integers(0, 1 << 16), which=st.integers(0, 3))
    def use_after_free(self, pick, which):
        self.count()
        sid = self.freed[pick % len(self.freed)]
        if sid in self.tokens:
            return
        mgr, child = self.mgr, self.next_id + 1
        fn, error, match = [
            (lambda: mgr.free(sid), DoubleFreeError, f"cannot free sequence {sid}: it was already"),
            (lambda: mgr.append_slots(sid, [1]), FreedSequenceError,
             f"cannot append to sequence {sid}: it was freed"),
            (lambda: mgr.fork(sid, child), FreedSequenceError, f"fork sequence {sid}: it was freed"),
            (lambda: mgr.swap_out([sid]), FreedSequenceError, f"swap out sequence {sid}: it was"),
        ][which]
        self.expect_unchanged(fn, error, match)

    @rule(sid=st.integers(-50, -1), which=st.integers(0, 4))
    def unknown_sequence(self, sid, which):
        self.count()
        mgr, child = self.mgr, self.next_id + 1
        fn = [lambda: mgr.free(sid), lambda: mgr.append_slots(sid, [0]),
              lambda: mgr.fork(sid, child), lambda: mgr.swap_in([sid]),
              lambda: mgr.build_metadata([sid])][which]
        error = self.expect_unchanged(fn, UnknownSequenceError, f"sequence {sid}: it was never")
        assert type(error) is UnknownSequenceError

    @precondition(lambda self: len(self.tokens) >= 1)
    @rule(pick=st.integers(0, 1 << 16), other=st.integers(0, 1 << 16))
    def duplicate_ids(self, pick, other):
        self.count()
        live = sorted(self.tokens)
        sid, existing = live[pick % len(live)], live[other % len(live)]
        if sid in self.swapped:
            self.expect_unchanged(lambda: self.mgr.allocate(existing, [0]), DuplicateSequenceError,
                                  f"cannot allocate sequence {existing}: it is already allocated")
        else:
            self.expect_unchanged(lambda: self.mgr.fork(sid, existing), DuplicateSequenceError,
                                  f"into {existing}: {existing} already exists")

    @precondition(lambda self: self.tokens)
    @rule(pick=st.integers(0, 1 << 16))
    def wrong_swap_direction(self, pick):
        self.count()
        live = sorted(self.tokens)
        sid = live[pick % len(live)]
        if sid in self.swapped and pick % 2:
            self.expect_unchanged(lambda: self.mgr.swap_out([sid]), SwapError, "is swapped out")
        elif sid in self.swapped:
            self.expect_unchanged(lambda: self.mgr.append_slots(sid, [0]), SwapError,
                                  "is swapped out")
        else:
            self.expect_unchanged(lambda: self.mgr.swap_in([sid]), SwapError,
                                  "is running on the GPU")
