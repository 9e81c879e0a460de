"""Preemption for the scheduler: making room for a group by preempting the latest arrivals,
swapped out to the CPU pool or freed to be recomputed.

Mixed into :class:`~pagedattn.integrations.engine.scheduler.Scheduler`, whose queues, allocator
and per-step budget it uses.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import TYPE_CHECKING

from pagedattn.integrations.engine.sequence import SequenceGroup, SequenceStatus

if TYPE_CHECKING:
    from pagedattn.integrations.engine.scheduler import SchedulerOutput

__all__ = ["PreemptionMixin"]


class PreemptionMixin:
    """``_make_room`` and ``_preempt``."""

    def _make_room(self, need_fn: Callable[[], int], g: SequenceGroup, out: SchedulerOutput,
                   allow_self: bool, may_preempt: bool = True) -> int | None:
        """Preempt latest arrivals until ``need_fn()`` blocks are free; the need, or ``None``."""
        while True:
            need = need_fn()
            if need <= self._free():
                return need
            if not may_preempt:
                return None
            if not self._allow_preemption:
                out.stalled = True
                return None
            victim = next((v for v in reversed(self.running) if id(v) not in self._committed),
                          None)
            if victim is None or (victim is g and not allow_self):
                return None
            if victim is g and len(self.running) == 1 and not self._decodes:
                # Alone and still short of blocks: the group can never fit.
                self.running.remove(g)
                g.error = self._too_big(g, self.mgr.num_gpu_blocks - self._free() + need,
                                        self.mgr.num_gpu_blocks)
                self.finish_group(g, SequenceStatus.FINISHED_IGNORED)
                out.ignored.append(g)
                return None
            self._preempt(victim, out)
            if victim is g:
                return None

    def _preempt(self, g: SequenceGroup, out: SchedulerOutput) -> None:
        entry = self._decodes.pop(id(g), None)
        if entry is not None:  # scheduled to decode this step, appends not made yet: undo
            need = entry[1]
            if need is None:
                need = self.mgr.num_blocks_to_append([s.seq_id for s in g.seqs], 1)
            self._reserved -= need
            self._budget += g.num_live
            self._seqs_left += g.num_live
        self.running.remove(g)
        self.num_preemptions += 1
        g.num_preemptions += 1
        out.preempted.append(g)
        ids = [s.seq_id for s in g.seqs]
        if (self.config.preemption_mode == "swap" and all(i in self.mgr for i in ids)
                and self.mgr.can_swap_out(ids)):
            out.blocks_to_swap_out.extend(self.mgr.swap_out(ids))
            for s in g.seqs:
                s.status = SequenceStatus.SWAPPED
            bisect.insort(self.swapped, g, key=lambda x: x.key)
            return
        for s in g.seqs:  # recompute
            self.free_seq(s)
            s.num_computed_tokens = 0
            s.status = SequenceStatus.WAITING
        self._insert_waiting(g)  # back among the waiting, in arrival order
