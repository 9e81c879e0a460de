"""A launched step of the engine and the building of a step's input.

:func:`build_step_input` turns the scheduler's batch into the runner's :class:`StepInput` (host
tensors), with the inputs that are a still-running step's samples marked pending;
:class:`LaunchedStep` is a step whose forward and sampling are queued on the device, read later by
the engine (at once, or after the next step is launched: async scheduling).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pagedattn.integrations.engine.runner import StepInput
from pagedattn.integrations.engine.sampling import PendingSample
from pagedattn.integrations.engine.scheduler import SchedulerOutput
from pagedattn.integrations.engine.sequence import Sequence, SequenceGroup

from pagedattn.alloc import BlockManager

__all__ = ["LaunchedStep", "build_step_input"]


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
    _rows: dict[int, int] | None = None

    def sample_row(self, seq: Sequence) -> int:
        """The row of ``seq``'s sample in ``sample.ids``."""
        if self._rows is None:
            self._rows = {s.seq_id: j for j, (_, s) in enumerate(self.targets)}
        return self._rows[seq.seq_id]


def build_step_input(out: SchedulerOutput, block_manager: BlockManager, prev: LaunchedStep | None
                     ) -> tuple[StepInput, list[tuple[Sequence, int]]]:
    """The step's input on the host, and its pending inputs ``[(seq, row of prev's samples)]``:
    sequences whose input token ``prev`` (still running) sampled, filled in on the device."""
    seqs = out.seqs
    ids = [x.seq.seq_id for x in seqs]
    pending: list[tuple[Sequence, int]] = []
    src: list[int] = []
    if out.num_prefill_tokens == 0:
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
        prev_token_ids=prev.sample.ids if src else None,
    )
    return step, pending
