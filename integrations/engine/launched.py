"""A launched step of the engine and the building of a step's input.

:func:`build_step_input` turns the scheduler's batch into the runner's :class:`StepInput` (host
tensors), with the inputs that are a still-running step's samples marked pending;
:class:`LaunchedStep` is a step whose forward and sampling are queued on the device, read later by
the engine (at once, or after the next step is launched: async scheduling).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch
from pagedattn.integrations.engine.runner import StepInput
from pagedattn.integrations.engine.sampling import PendingSample
from pagedattn.integrations.engine.scheduler import SchedulerOutput
from pagedattn.integrations.engine.sequence import Sequence, SequenceGroup

from pagedattn.alloc import BlockManager

__all__ = ["LaunchedChain", "LaunchedStep", "build_step_input", "build_substep_input"]


@dataclass(slots=True, eq=False)
class LaunchedStep:
    """A step whose forward and sampling are queued on the device.

    Attributes:
        targets: per sample, its group and sequence (the sampler's row order).
        counted: per sample, whether its token was counted in ``seq.num_pending`` (empty unless
            ``overlappable``).
        overlappable: the next step may be scheduled before this one's tokens are read.
        pending: the step's inputs that were the previous step's pending tokens:
            ``(seq, row of the previous step's samples)``.
        rows: per target, its row in the samples (None: target ``j`` is row ``j``; a later step
            of a multi-step schedule samples every row, its targets only the rows still running).
    """

    out: SchedulerOutput
    sample: PendingSample | None
    targets: list[tuple[SequenceGroup, Sequence]]
    counted: list[bool]
    beams: dict[int, tuple[SequenceGroup, list[int]]]
    touched: list[SequenceGroup]
    logits: torch.Tensor | None
    pending: list[tuple[Sequence, int]]
    overlappable: bool
    start: float
    rows: list[int] | None = None


@dataclass(slots=True, eq=False)
class LaunchedChain:
    """The steps launched from one schedule, read in order: one step, or the decode steps of a
    multi-step schedule (step ``j + 1``'s inputs are step ``j``'s samples).

    Its samples, step after step, are one flat row space (:meth:`ids`, :meth:`sample_row`): the
    next schedule's pending inputs name a sequence's last sample in it.
    """

    steps: list[LaunchedStep]
    _ids: torch.Tensor | None = None
    _rows: dict[int, int] | None = None
    _offsets: list[int] | None = None

    @property
    def overlappable(self) -> bool:
        return all(st.overlappable for st in self.steps)

    def _layout(self) -> None:
        rows: dict[int, int] = {}
        offsets, start = [], 0
        for st in self.steps:
            offsets.append(start)
            at = st.rows
            for j, (_, seq) in enumerate(st.targets):
                # a later step's sample replaces an earlier one
                rows[seq.seq_id] = start + (at[j] if at is not None else j)
            start += st.sample.ids.shape[0] if st.sample is not None else 0
        self._rows, self._offsets = rows, offsets

    def ids(self) -> torch.Tensor:
        """[R] int64 sampled ids of every step, on the device, step after step."""
        if self._ids is None:
            parts = [st.sample.ids for st in self.steps if st.sample is not None]
            self._ids = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self._ids

    def sample_row(self, seq: Sequence) -> int:
        """The row of ``seq``'s last sample in :meth:`ids`."""
        if self._rows is None:
            self._layout()
        return self._rows[seq.seq_id]

    def split_pending(self, pending: list[tuple[Sequence, int]]) -> list[tuple[list[tuple[Sequence, int]], int]]:
        """``pending`` (``(seq, row in ids())``) per step: the entries naming the step's samples
        (the same tuples), and the step's first row in :meth:`ids`."""
        if self._offsets is None:
            self._layout()
        offsets = self._offsets
        per: list[tuple[list[tuple[Sequence, int]], int]] = [([], o) for o in offsets]
        for entry in pending:
            per[bisect.bisect_right(offsets, entry[1]) - 1][0].append(entry)
        return per


def build_step_input(out: SchedulerOutput, block_manager: BlockManager, prev: LaunchedChain | None
                     ) -> tuple[StepInput, list[tuple[Sequence, int]]]:
    """The step's input on the host (the first step of a multi-step schedule), and its pending
    inputs ``[(seq, row of prev's samples)]``: sequences whose input token ``prev`` (still running)
    sampled, filled in on the device."""
    seqs = out.seqs
    ids = [x.seq.seq_id for x in seqs]
    pending: list[tuple[Sequence, int]] = []
    src: list[int] = []
    if out.num_steps > 1:
        # the slots of every step are appended: step 0 computes each sequence's first of them,
        # its tables wide enough for the last step's
        computed = np.fromiter((x.num_computed for x in seqs), np.int64, len(seqs))
        ends = computed + np.fromiter((x.num_steps for x in seqs), np.int64, len(seqs))
        width = -(-int(ends.max()) // block_manager.block_size)
        meta = block_manager.build_metadata(ids, 1, computed, max_num_blocks=width)
        max_q, num_tokens = 1, len(seqs)
    elif out.num_prefill_tokens == 0:
        meta = block_manager.build_metadata(ids)
        max_q, num_tokens = 1, len(seqs)
    else:
        new = np.fromiter((x.num_new_tokens for x in seqs), np.int64, len(seqs))
        meta = block_manager.build_metadata(ids, new)
        max_q, num_tokens = int(new.max()), int(new.sum())
    tokens: list[int] = []
    for x in seqs:
        seq = x.seq
        if seq.num_pending:
            # A pending token is the sequence's last, so always a decode row's one new token.
            if not src:
                src = [-1] * num_tokens
            row = prev.sample_row(seq)
            src[len(tokens)] = row
            pending.append((seq, row))
            tokens.append(0)
        elif x.num_new_tokens == 1:
            tokens.append(seq.token_ids[x.num_computed])
        else:
            tokens.extend(seq.token_ids[x.num_computed:x.num_computed + x.num_new_tokens])
    # Host tensors (no copies of the numpy arrays): the runner uploads them, a decode step
    # through its CUDA graphs' pinned buffers.
    qsl = torch.from_numpy(meta.query_start_loc)
    step = StepInput(
        input_ids=torch.tensor(tokens, dtype=torch.int64),
        positions=torch.from_numpy(meta.positions),
        slot_mapping=torch.from_numpy(meta.slot_mapping),
        block_tables=torch.from_numpy(np.ascontiguousarray(meta.block_tables)),
        seq_lens=torch.from_numpy(meta.seq_lens),
        cu_seqlens_q=qsl,
        max_query_len=max_q,
        logits_indices=qsl[1:].to(torch.int64) - 1,
        pending_src=torch.tensor(src, dtype=torch.int64) if src else None,
        prev_token_ids=prev.ids() if src else None,
    )
    return step, pending


def build_substep_input(out: SchedulerOutput, first: StepInput, block_size: int, j: int,
                        prev_ids: torch.Tensor) -> StepInput:
    """Step ``j >= 1`` of a multi-step schedule on the host: every row's input is its sample of
    step ``j - 1`` (``prev_ids``: [S] int64 on the device, every row sampled), at the next
    position, in the blocks ``first`` (step 0) names. Rows whose sequence runs fewer steps are
    padding (no slot written, one key of their first block attended)."""
    seqs = out.seqs
    num = len(seqs)
    p = first.positions.numpy() + j
    steps = np.fromiter((x.num_steps for x in seqs), np.int64, num)
    alive = steps > j
    tables = first.block_tables.numpy()
    cols = np.minimum(p // block_size, tables.shape[1] - 1)
    slots = tables[np.arange(num), cols].astype(np.int64) * block_size + p % block_size
    src = np.where(alive, np.arange(num), -1)  # the previous step sampled every row
    qsl = first.cu_seqlens_q
    step = StepInput(
        input_ids=torch.zeros(num, dtype=torch.int64),
        positions=torch.from_numpy(np.where(alive, p, 0)),
        slot_mapping=torch.from_numpy(np.where(alive, slots, -1)),
        block_tables=first.block_tables,
        seq_lens=torch.from_numpy(np.where(alive, p + 1, 1).astype(np.int32)),
        cu_seqlens_q=qsl,
        max_query_len=1,
        logits_indices=first.logits_indices,
        pending_src=torch.from_numpy(src),
        prev_token_ids=prev_ids,
    )
    return step
