"""Admission for the scheduler: swapping groups back in, when to admit waiting groups (in
batches under a full queue), admitting them, and deciding which requests can never run (longer
than the model, the step budget or the whole pool).

Mixed into :class:`~pagedattn.integrations.engine.scheduler.Scheduler`, whose queues, allocator
and per-step budget it uses.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from pagedattn.integrations.engine.sequence import SequenceGroup, SequenceStatus

from pagedattn.alloc import AllocStatus

if TYPE_CHECKING:
    from pagedattn.integrations.engine.scheduler import SchedulerOutput

__all__ = ["AdmissionMixin"]


class AdmissionMixin:
    """``_schedule_swapped``, ``_admission_due``, ``_schedule_waiting`` and ``never_fits``."""

    # ---------------------------------------------------------------------- swapped
    def _schedule_swapped(self, out: SchedulerOutput) -> None:
        mgr = self.mgr
        while self.swapped:
            g = self.swapped[0]
            k = g.num_live
            if k > self._budget or k > self._seqs_left:
                break
            ids = [s.seq_id for s in g.seqs]
            if mgr.can_swap_in(ids) is not AllocStatus.OK:
                break
            blocks = len({b for i in ids for b in mgr.get_block_table(i)})
            if blocks + k + mgr.watermark_blocks > self._free():
                break
            self.swapped.pop(0)
            out.blocks_to_swap_in.extend(mgr.swap_in(ids))
            for s in g.seqs:
                s.status = SequenceStatus.RUNNING
            bisect.insort(self.running, g, key=lambda x: x.key)
            if self._decode_ready(g):
                ok = self._schedule_decode(g, out, False, may_preempt=False)
            else:
                ok = self._schedule_prefill(g, out, False, may_preempt=False) > 0
            if not ok:
                break

    # ---------------------------------------------------------------------- waiting
    def never_fits(self, g: SequenceGroup) -> str | None:
        """Why ``g`` can never be scheduled, or ``None``."""
        cfg, mgr = self.config, self.mgr
        longest = max(len(s.token_ids) for s in g.seqs)
        what = "prompt" if longest == len(g.prompt_token_ids) else "sequence"
        if self.max_model_len is not None and longest > self.max_model_len:
            return (f"request {g.request_id!r}: {what} of {longest} tokens is longer than "
                    f"max_model_len={self.max_model_len}")
        if not cfg.enable_chunked_prefill and longest > cfg.max_num_batched_tokens:
            return (f"request {g.request_id!r}: {what} of {longest} tokens is longer than "
                    f"max_num_batched_tokens={cfg.max_num_batched_tokens} and chunked prefill "
                    f"is off")
        if g.num_live > cfg.max_num_seqs:
            return (f"request {g.request_id!r} runs {g.num_live} sequences at once, more than "
                    f"max_num_seqs={cfg.max_num_seqs}")
        usable = mgr.num_gpu_blocks - mgr.watermark_blocks
        need = self._group_blocks(g)
        if need > usable:
            return self._too_big(g, need, usable)
        return None

    def _too_big(self, g: SequenceGroup, need: int, usable: int) -> str:
        longest = max(len(s.token_ids) for s in g.seqs)
        what = "prompt" if longest == len(g.prompt_token_ids) else "sequence"
        if g.num_live > 1:
            what = f"{g.num_live} sequences of up to {longest} tokens need"
        else:
            what = f"{what} of {longest} tokens needs"
        return (f"request {g.request_id!r}: {what} {need} KV-cache blocks of "
                f"{self.mgr.block_size} tokens but the pool has {self.mgr.num_gpu_blocks} "
                f"({usable} usable above the watermark)")

    def _group_blocks(self, g: SequenceGroup) -> int:
        """Blocks the group's sequences take in all (full blocks of a common prefix shared)."""
        bs = self.mgr.block_size
        first = g.seqs[0].token_ids
        total = -(-len(first) // bs)
        for s in g.seqs[1:]:
            common = 0
            if self.mgr.enable_prefix_caching:
                limit = min(len(first), len(s.token_ids)) // bs
                while common < limit and (first[common * bs:(common + 1) * bs]
                                          == s.token_ids[common * bs:(common + 1) * bs]):
                    common += 1
            total += -(-len(s.token_ids) // bs) - common
        return total

    def _prefill_reserve(self) -> int:
        """Blocks the running groups still in prefill will take for the rest of their prompts."""
        mgr, bs, total = self.mgr, self.mgr.block_size, 0
        for g in self.running:
            for s in g.seqs:
                if s.seq_id in mgr:
                    num = mgr.get_num_tokens(s.seq_id)
                    if len(s.token_ids) - num > 1:  # still prefilling
                        total += -(-len(s.token_ids) // bs) - -(-num // bs)
                else:
                    total += -(-len(s.token_ids) // bs)
        return total

    def _admission_due(self) -> bool:
        """Whether waiting requests may be admitted this step (``admit_min_free_seqs``): always
        when the step has no decode rows; never when no sequence slot is free (the step may then
        run several decode steps, ``num_scheduler_steps``); else once ``admit_min_free_seqs``
        slots are free, every waiting request fits in them, or ``admit_max_delay_steps`` decode
        steps passed since the last admission."""
        cfg, free = self.config, self._seqs_left
        if not self._decodes:
            return True
        return free > 0 and (cfg.admit_max_delay_steps == 0 or free >= cfg.admit_min_free
                             or len(self.waiting) <= free
                             or self._deferred_steps >= cfg.admit_max_delay_steps)

    def _schedule_waiting(self, out: SchedulerOutput) -> None:
        mgr, bs = self.mgr, self.mgr.block_size
        reserve = None
        while self.waiting and self._budget > 0 and self._seqs_left > 0:
            g = self.waiting[0]
            error = self.never_fits(g)
            if error is not None:
                self.waiting.popleft()
                g.error = error
                self.finish_group(g, SequenceStatus.FINISHED_IGNORED)
                out.ignored.append(g)
                continue
            if g.num_live > self._seqs_left:
                break
            if reserve is None:
                reserve = self._prefill_reserve()
            first = g.seqs[0]
            hit, revived = self._probe(first.token_ids,
                                       len(first.token_ids) - (2 if g.num_live > 1 else 1))
            need = self._group_blocks(g) - hit // bs + revived
            if need + reserve + mgr.watermark_blocks > self._free():
                break
            before = mgr.num_free_blocks
            self.waiting.popleft()
            for s in g.seqs:
                s.status = SequenceStatus.RUNNING
            bisect.insort(self.running, g, key=lambda x: x.key)
            if (self._schedule_prefill(g, out, False, may_preempt=False) == 0
                    and id(g) not in self._committed):
                # Nothing fit this step (budget): back to the head of the queue.
                self.running.remove(g)
                for s in g.seqs:
                    s.status = SequenceStatus.WAITING
                self.waiting.appendleft(g)
                break
            reserve += max(0, need - (before - mgr.num_free_blocks))

