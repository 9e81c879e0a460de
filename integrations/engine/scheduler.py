"""Iteration-level FCFS scheduler: one mixed prefill + decode batch per step.

Each step, in order:

1. running groups ready to decode (every live sequence has one uncomputed token) get one token per
   sequence; their allocator appends are batched (``append_slots_batch``) at the end of the step;
2. running groups still in prefill get the next chunk of their prompt;
3. swapped-out groups are swapped back in (only if nothing was preempted this step);
4. waiting groups are admitted in arrival order while the token budget, ``max_num_seqs`` and the
   free blocks (whole prompt, watermark kept) allow (only if nothing is swapped out and nothing was
   preempted this step, and, while decode rows run, once ``admit_min_free_seqs`` slots are free or
   the other conditions of :meth:`Scheduler._admission_due` hold: prompts join in batches).

Blocks are allocated only for tokens computed in the step (a prompt is allocated chunk by chunk),
so every block the prefix cache holds has its KV written by the time any other step reads it.
When blocks run out, the latest-arrived running group not yet committed in this step is preempted
(whole group): swapped to the CPU pool, or freed and sent back to the waiting queue to be
recomputed (its prompt plus its output tokens become the tokens to prefill).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from pagedattn.integrations.engine.admission import AdmissionMixin
from pagedattn.integrations.engine.config import EngineConfig
from pagedattn.integrations.engine.preemption import PreemptionMixin
from pagedattn.integrations.engine.sequence import (
    Sequence,
    SequenceGroup,
    SequenceStatus,
)

from pagedattn.alloc import PENDING_TOKEN, BlockManager

__all__ = ["ScheduledSeq", "Scheduler", "SchedulerOutput"]


@dataclass(slots=True)
class ScheduledSeq:
    """A sequence of the step: it computes tokens ``[num_computed, num_computed + num_new)``."""

    seq: Sequence
    group: SequenceGroup
    num_new_tokens: int
    num_computed: int
    #: decode steps the sequence runs from this schedule (more than 1: see ``SchedulerOutput.num_steps``)
    num_steps: int = 1

    def last_step(self, max_model_len: int | None) -> int:
        """The step ``j`` whose sample is the sequence's last by length (``max_tokens`` outputs or
        ``max_model_len`` tokens); step 0 computes this schedule's tokens, step ``j`` the token
        ``j`` positions later (multi-step decode). 0 or less: this schedule's first sample is."""
        end = self.num_computed + self.num_new_tokens  # tokens held after step 0, before its sample
        last = self.group.params.max_tokens + self.seq.prompt_len - end - 1
        return last if max_model_len is None else min(last, max_model_len - end - 1)

    @property
    def samples(self) -> bool:
        """Whether the step computes the sequence's last token (so its logits are sampled)."""
        return self.num_computed + self.num_new_tokens == len(self.seq.token_ids) + self.seq.num_pending


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[SequenceGroup] = field(default_factory=list)
    ignored: list[SequenceGroup] = field(default_factory=list)
    num_batched_tokens: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_cached_tokens: int = 0
    #: a group that could run was left out because preemption was not allowed this step
    stalled: bool = False
    #: decode steps run from this schedule (multi-step decode): sequence ``x`` computes its
    #: positions ``x.num_computed .. x.num_computed + x.num_steps - 1``, one a step, each step's
    #: input the previous step's sample; its slots are all appended now, pending but the first
    num_steps: int = 1

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler(AdmissionMixin, PreemptionMixin):
    """Owns the waiting / running / swapped queues and the allocator calls of each step."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager,
                 max_model_len: int | None = None) -> None:
        self.config = config
        self.mgr = block_manager
        self.max_model_len = max_model_len
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []   # sorted by arrival (group.key)
        self.swapped: list[SequenceGroup] = []   # sorted by arrival
        self.num_preemptions = 0
        self.num_swapped_out_blocks = 0
        self.num_swapped_in_blocks = 0
        #: decode steps run since waiting requests were last admitted (``admit_max_delay_steps``)
        self._deferred_steps = 0
        self._reset_step()

    # ------------------------------------------------------------------------- requests
    def add(self, group: SequenceGroup) -> None:
        self._insert_waiting(group, from_back=True)

    def _insert_waiting(self, g: SequenceGroup, from_back: bool = False) -> None:
        """Insert ``g`` into the waiting queue by arrival (FCFS), scanning from one end."""
        w = self.waiting
        if from_back:
            i = len(w)
            while i > 0 and w[i - 1].key > g.key:
                i -= 1
        else:
            i = 0
            while i < len(w) and w[i].key < g.key:
                i += 1
        w.insert(i, g)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.swapped)

    def abort(self, request_id: str) -> SequenceGroup | None:
        """Remove a request from its queue and free its blocks; ``None`` if not found."""
        for queue in (self.waiting, self.running, self.swapped):
            for g in queue:
                if g.request_id == request_id:
                    queue.remove(g)
                    self.finish_group(g, SequenceStatus.FINISHED_ABORTED)
                    return g
        return None

    def free_seq(self, seq: Sequence) -> None:
        if seq.seq_id in self.mgr:
            self.mgr.free(seq.seq_id)

    def finish_group(self, g: SequenceGroup, status: SequenceStatus) -> None:
        """Finish every live sequence of ``g`` with ``status`` and free their blocks."""
        for s in g.seqs:
            self.free_seq(s)
            s.status = status
            g.finished_seqs.append(s)
        g.seqs = []

    def remove_finished(self, g: SequenceGroup) -> None:
        """Drop a group whose sequences all finished from the running queue."""
        i = bisect.bisect_left(self.running, g.key, key=lambda x: x.key)
        if i < len(self.running) and self.running[i] is g:
            del self.running[i]
        else:
            self.running.remove(g)

    # ---------------------------------------------------------------------------- step
    def _reset_step(self) -> None:
        self._budget = self.config.max_num_batched_tokens
        self._seqs_left = self.config.max_num_seqs
        self._reserved = 0                            # blocks of deferred decode appends
        self._decodes: dict[int, tuple[SequenceGroup, int | None]] = {}  # id(group) -> (group, need)
        self._committed: set[int] = set()             # groups with allocator work done this step
        self._prefill: list[ScheduledSeq] = []
        self._allow_preemption = True
        self._admission_deferred = False

    def _free(self) -> int:
        return self.mgr.num_free_blocks - self._reserved

    def schedule(self, allow_preemption: bool = True, num_steps: int = 1) -> SchedulerOutput:
        """The next step's batch.

        Args:
            allow_preemption: False while the previous step still runs (its sequences' sampled
                tokens are pending): groups that would need a preemption wait instead, and the
                output says so (``stalled``).
            num_steps: the most decode steps to run from this schedule. More than one are given
                only to a batch of decode rows alone (nothing in prefill or swapped out, no
                preemption, no request waiting unless its admission was deferred) whose groups
                sample one token a sequence from the engine's generator or their own (no beams,
                no parallel samples sharing a generator), when the blocks for ``num_steps``
                tokens a sequence are free; a sequence runs fewer steps when its ``max_tokens``
                or the model's length end it sooner.
        """
        out = SchedulerOutput()
        self._reset_step()
        self._allow_preemption = allow_preemption
        rest = self._schedule_all_decodes()
        # When every decoding group was admitted in one pass, only the others (prefilling) are left.
        phases = ((True, list(self.running)), (False, list(self.running))) if rest is None else ((False, rest),)
        for decode_phase, groups in phases:
            for g in groups:
                if id(g) in self._decodes or id(g) in self._committed or g not in self.running:
                    continue
                if self._decode_ready(g) != decode_phase:
                    continue
                if decode_phase:
                    self._schedule_decode(g, out, allow_self=True)
                else:
                    self._schedule_prefill(g, out, allow_self=False)
        if not out.preempted and self.swapped:
            self._schedule_swapped(out)
        if not out.preempted and not self.swapped and self.waiting:
            if self._admission_due():
                num_waiting = len(self.waiting)
                self._schedule_waiting(out)
                if len(self.waiting) < num_waiting:
                    self._deferred_steps = 0
            else:
                self._admission_deferred = True
        # The decode fast path: one vectorized append for every decoding sequence.
        ids, tokens = [], []
        for g, _ in self._decodes.values():
            for s in g.seqs:
                out.seqs.append(ScheduledSeq(s, g, 1, s.num_computed_tokens))
                ids.append(s.seq_id)
                tokens.append(s.token_ids[-1] if not s.num_pending else PENDING_TOKEN)
        if ids:
            steps = self._multi_step_counts(out, ids, num_steps) if num_steps > 1 else None
            out.blocks_to_copy.extend(self.mgr.append_slots_batch(ids, tokens))
            if steps is not None:
                # the later steps' inputs are the earlier steps' samples: pending slots
                for j in range(1, out.num_steps):
                    more = [i for i, r in zip(ids, steps) if r > j]
                    self.mgr.append_slots_batch(more, [PENDING_TOKEN] * len(more))
        out.num_decode_tokens = len(ids)
        if self.waiting:
            self._deferred_steps += out.num_steps
        out.seqs.extend(self._prefill)
        out.num_prefill_tokens = sum(x.num_new_tokens for x in self._prefill)
        out.num_batched_tokens = out.num_decode_tokens + out.num_prefill_tokens
        self.num_swapped_out_blocks += len(out.blocks_to_swap_out)
        self.num_swapped_in_blocks += len(out.blocks_to_swap_in)
        return out

    # ----------------------------------------------------------------------- decode
    def _schedule_all_decodes(self) -> list[SequenceGroup] | None:
        """The common case in one pass: when every decode-ready running group fits this step's
        token, sequence and block budgets together, schedule them all with one block count.

        Equivalent to scheduling them one by one (each prefix of the groups then fits too, so
        nobody is preempted); when they do not all fit, nothing is done here and the per-group
        path below decides whom to preempt. Groups share no partly filled block with each other
        (only forks of one group do), so the total need is the sum of the groups' own needs.

        Returns:
            The running groups that are not decode-ready, in order, when every decode-ready group
            was admitted; None when nothing was done.
        """
        groups, ids, rest = [], [], []
        live = self.mgr.__contains__
        for g in self.running:
            seqs = g.seqs
            if len(seqs) == 1:  # the common case, inlined: one sequence with one token to compute
                s = seqs[0]
                if len(s.token_ids) + s.num_pending - s.num_computed_tokens == 1 and live(s.seq_id):
                    groups.append(g)
                    ids.append(s.seq_id)
                    continue
                rest.append(g)
            elif self._decode_ready(g):
                groups.append(g)
                ids.extend([s.seq_id for s in seqs])
            else:
                rest.append(g)
        if not ids or len(ids) > self._budget or len(ids) > self._seqs_left:
            return None
        need = self.mgr.num_blocks_to_append(ids, 1)
        if need > self._free():
            return None
        for g in groups:
            self._decodes[id(g)] = (g, None)  # its own need, counted again if it is preempted
        self._reserved += need
        self._budget -= len(ids)
        self._seqs_left -= len(ids)
        return rest

    def _multi_step_counts(self, out: SchedulerOutput, ids: list[int], num_steps: int) -> list[int] | None:
        """Decode steps per sequence of ``out`` (all decode rows, in order) when this schedule may
        run several (see :meth:`schedule`), setting ``num_steps`` on ``out`` and its rows; None
        (one step) otherwise."""
        if (out.preempted or self._prefill or (self.waiting and not self._admission_deferred)
                or self.swapped or out.stalled):
            return None
        for x in out.seqs:
            g = x.group
            if g.beam is not None or not g.forked or (g.generator is not None and len(g.seqs) > 1):
                return None
        if self.mgr.num_blocks_to_append(ids, num_steps) > self.mgr.num_free_blocks:
            return None
        max_len = self.max_model_len
        steps = []
        for x in out.seqs:  # steps up to the one whose sample is the sequence's last
            x.num_steps = r = max(1, min(num_steps, x.last_step(max_len) + 1))
            steps.append(r)
        out.num_steps = max(steps)
        return steps if out.num_steps > 1 else None

    def _decode_ready(self, g: SequenceGroup) -> bool:
        mgr, seqs = self.mgr, g.seqs
        if len(seqs) == 1:  # the common case, without a generator
            s = seqs[0]
            return len(s.token_ids) + s.num_pending - s.num_computed_tokens == 1 and s.seq_id in mgr
        return all(s.seq_id in mgr and len(s.token_ids) + s.num_pending - s.num_computed_tokens == 1
                   for s in seqs)

    def _schedule_decode(self, g: SequenceGroup, out: SchedulerOutput, allow_self: bool,
                         may_preempt: bool = True) -> bool:
        k = g.num_live
        if k > self._budget or k > self._seqs_left:
            return False
        ids = [s.seq_id for s in g.seqs]
        need_fn = lambda: self.mgr.num_blocks_to_append(ids, 1)
        need = self._make_room(need_fn, g, out, allow_self, may_preempt)
        if need is None:
            return False
        self._decodes[id(g)] = (g, need)
        self._reserved += need
        self._budget -= k
        self._seqs_left -= k
        return True

    # ---------------------------------------------------------------------- prefill
    def _probe(self, tokens: list[int], max_cached: int) -> tuple[int, int]:
        """Leading prompt tokens already cached (a multiple of the block size, at most
        ``max_cached``) and how many of those blocks are free (revived by a hit)."""
        mgr = self.mgr
        if not mgr.enable_prefix_caching or max_cached < mgr.block_size:
            return 0, 0
        return mgr.probe_prefix(tokens[:max_cached + 1])

    def _schedule_prefill(self, g: SequenceGroup, out: SchedulerOutput, allow_self: bool,
                          may_preempt: bool = True) -> int:
        """Schedule the next prompt chunk(s) of ``g``; returns the tokens scheduled.

        A multi-sequence group (recomputed parallel samples or beams) prefills each sequence up to
        its last token first; the last tokens are then computed together (a decode step), so all
        the group's sequences sample in the same step.
        """
        mgr, bs, cfg = self.mgr, self.mgr.block_size, self.config
        multi = g.num_live > 1
        total = 0
        for s in g.seqs:
            if self._budget <= 0 or self._seqs_left <= 0:
                break
            n = len(s.token_ids)
            allocated = s.seq_id in mgr
            if allocated:
                nc = s.num_computed_tokens
                if n - nc <= (1 if multi else 0):
                    continue
            else:
                nc, _ = self._probe(s.token_ids, n - (2 if multi else 1))
            cap = n - nc - (1 if multi else 0)
            k = min(cap, self._budget)
            if k < cap and not cfg.enable_chunked_prefill:
                break
            if allocated:
                need_fn = lambda s=s, k=k: mgr.num_blocks_to_append([s.seq_id], k)
            else:
                def need_fn(s=s, k=k, nc=nc):
                    hit, revived = self._probe(s.token_ids, nc)
                    return -(-(nc + k) // bs) - hit // bs + revived
            if self._make_room(need_fn, g, out, allow_self, may_preempt) is None:
                break
            if allocated:
                out.blocks_to_copy.extend(mgr.append_slots(s.seq_id, s.token_ids[nc:nc + k]))
            else:
                # the prompt's hashes (made when it arrived) serve a chunk within the prompt
                hashes = g.block_hashes
                got = mgr.allocate(s.seq_id, s.token_ids[:nc + k], block_hashes=(
                    hashes.prefix(nc + k) if hashes is not None and nc + k <= s.prompt_len else None))
                k += nc - got
                nc = got
                s.num_computed_tokens = got
                out.num_cached_tokens += got
            self._committed.add(id(g))
            self._prefill.append(ScheduledSeq(s, g, k, nc))
            self._budget -= k
            self._seqs_left -= 1
            total += k
        return total
