"""One model step's input: the packed new tokens of every scheduled sequence and their paged metadata."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch


def fill_pending(input_ids: torch.Tensor, pending_src: torch.Tensor, prev_token_ids: torch.Tensor) -> torch.Tensor:
    """``input_ids`` with ``prev_token_ids[pending_src]`` where ``pending_src >= 0`` (all [T] int64 but
    ``prev_token_ids`` [R]; device ops only, so the decode CUDA graphs capture it too)."""
    return torch.where(pending_src >= 0, prev_token_ids[pending_src.clamp(min=0)], input_ids)


@dataclass
class StepInput:
    """The input of :meth:`ModelRunner.execute` for ``S`` sequences with ``T`` new tokens in all.

    The tensors live on the runner's device or on the CPU (:meth:`ModelRunner.execute` uploads a
    host-built step itself: decode steps through pinned buffers, others with :meth:`to`).

    Attributes:
        input_ids: [T] int64, every sequence's new tokens back to back.
        positions: [T] int64, each token's position within its own sequence.
        slot_mapping: [T] int64 cache slot ``block_id * block_size + offset`` of each token's K/V
            (negative: padding, not written).
        block_tables: [S, max_blocks] int32 block ids of each sequence (rows padded with any id).
        seq_lens: [S] int32 context length of each sequence after this step (new tokens included).
        cu_seqlens_q: [S + 1] int32 cumulative new-token counts (0 first, ``T`` last).
        max_query_len: the most new tokens of any one sequence (a host int).
        logits_indices: [S] int64 index in the packed batch of each sequence's last new token
            (the rows whose logits are returned).
        pending_src: optional [T] int64; where >= 0, the token's id is not known on the host
            yet and is ``prev_token_ids[pending_src]`` (an engine that schedules a step while the
            GPU still samples the previous one); -1 elsewhere.
        prev_token_ids: optional [R] int64, on the runner's device: the token ids the previous
            step sampled (needed with ``pending_src``).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_query_len: int
    logits_indices: torch.Tensor
    pending_src: Optional[torch.Tensor] = None
    prev_token_ids: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if (self.pending_src is None) != (self.prev_token_ids is None):
            raise ValueError("StepInput.pending_src and prev_token_ids go together (both or neither)")

    def resolved_input_ids(self) -> torch.Tensor:
        """``input_ids`` with the pending tokens filled in from ``prev_token_ids`` (on their device)."""
        if self.pending_src is None:
            return self.input_ids
        return fill_pending(self.input_ids, self.pending_src, self.prev_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: Union[str, torch.device]) -> "StepInput":
        """This step with every tensor on ``device`` (itself when they are all there already)."""
        device = torch.device(device)
        tensors = {f.name: v for f in dataclasses.fields(self)
                   if isinstance(v := getattr(self, f.name), torch.Tensor)}
        if all(t.device == device for t in tensors.values()):
            return self
        return dataclasses.replace(self, **{n: t.to(device, non_blocking=True) for n, t in tensors.items()})

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


def make_step_input(new_token_ids: Sequence[Sequence[int]], num_computed: Sequence[int],
                    block_tables: Sequence[Sequence[int]], block_size: int,
                    device: Union[str, torch.device] = "cpu") -> StepInput:
    """Build a :class:`StepInput` from host lists (a convenience for tests and simple drivers).

    Args:
        new_token_ids: per sequence, the token ids to run this step (at least one each).
        num_computed: per sequence, how many of its tokens are already in the cache (the first
            new token sits at this position).
        block_tables: per sequence, its block ids in order, covering at least
            ``num_computed + len(new_token_ids)`` tokens.
        block_size: tokens per cache block.
        device: where the tensors go.
    """
    if not (len(new_token_ids) == len(num_computed) == len(block_tables)) or not new_token_ids:
        raise ValueError("new_token_ids, num_computed and block_tables need one entry per sequence (at least one)")
    ids, positions, slots, seq_lens, cu, last = [], [], [], [], [0], []
    for tokens, start, table in zip(new_token_ids, num_computed, block_tables):
        if not tokens:
            raise ValueError("every scheduled sequence needs at least one new token")
        end = start + len(tokens)
        if len(table) * block_size < end:
            raise ValueError(f"a block table of {len(table)} blocks of {block_size} cannot hold {end} tokens")
        for pos in range(start, end):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        ids.extend(tokens)
        seq_lens.append(end)
        cu.append(cu[-1] + len(tokens))
        last.append(cu[-1] - 1)
    width = max(len(t) for t in block_tables)
    tables = [list(t) + [0] * (width - len(t)) for t in block_tables]

    i64, i32 = torch.int64, torch.int32
    return StepInput(
        input_ids=torch.tensor(ids, dtype=i64),
        positions=torch.tensor(positions, dtype=i64),
        slot_mapping=torch.tensor(slots, dtype=i64),
        block_tables=torch.tensor(tables, dtype=i32),
        seq_lens=torch.tensor(seq_lens, dtype=i32),
        cu_seqlens_q=torch.tensor(cu, dtype=i32),
        max_query_len=max(len(t) for t in new_token_ids),
        logits_indices=torch.tensor(last, dtype=i64),
    ).to(device)
